"""Privacy: the commands that serve users' rights and keep data no longer than configured.

The last stage: it may import every other stage (it reaches every place data lives, through
`gpurec.workspace.Workspace`), and none imports it. `forget` erases a user, `export_user` writes
what the system observed about one (access, GDPR Art. 15/20), `retention` deletes what is older
than the configured windows.
"""
