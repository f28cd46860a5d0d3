"""OpenAI's Batch API for the gateway's routes: files, batches, their store and their runner.

:mod:`.service` is what the routes call, :mod:`.runner` what every server process runs in the
background, :mod:`.store` the protocol of the two job stores (:mod:`.redis_store` for replicas,
:mod:`.local_store` for one server without Redis), :mod:`.files` the shared folder's files,
:mod:`.plan` the reading of an input file, :mod:`.lines` the lines of the output files.
"""
