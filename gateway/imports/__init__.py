"""Bulk backfill (issue 16): history imported through the live channels.

* :mod:`.readers`: NDJSON and CSV files record by record, with a byte cursor;
* :mod:`.service`: jobs, batches, refusals, resuming;
* :mod:`.repository`: the jobs' queries;
* :mod:`.endpoints`: ``/v1/imports``.
"""
