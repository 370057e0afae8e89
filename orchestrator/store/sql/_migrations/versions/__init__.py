"""The revisions, oldest first: `0001` the schema before migrations, then each change."""
