"""The `nucseg` command line: `predict`, the service commands, `up` and the embedded Redis launcher."""
