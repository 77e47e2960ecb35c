"""The CCAT data-transfer system: Celery workers and managers that move every raw file from
the telescope's SOURCE disks to the long-term archives and on to processing.

State lives in the operations database (:mod:`ccat_ops_db`); managers scan it and submit
tasks carrying only ids; workers do the I/O on the hosts that can reach the data.
"""

__version__ = "0.1.0"
