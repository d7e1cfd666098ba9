"""bkrepo: the repository engine behind ``bkr``: history, BAM files, sync."""
