"""Exit codes (sysexits.h), one table for the whole command. The README lists what each means."""

EX_OK = 0
EX_DATAERR = 65  # a bad CSV: nothing was queued
EX_UNAVAILABLE = 69  # the database cannot be reached at start
EX_SOFTWARE = 70  # results could not be written, or a crash
EX_IOERR = 74  # the log output was closed
EX_TEMPFAIL = 75  # `run --once` met a sending pause or a database outage: try again later
EX_CONFIG = 78  # bad configuration or an unusable schema: systemd does not restart on it
