"""``EMBED_WORKERS > 1``: one engine process (model + micro-batcher) behind N HTTP worker processes.

* :mod:`gateway.engine.protocol` - the frames on the local socket (msgpack, vectors as raw float32);
* :mod:`gateway.engine.server` - the engine process;
* :mod:`gateway.engine.client` - a worker's link to it, a stand-in for the encoder and batcher;
* :mod:`gateway.engine.connection` - the socket under that link: hello, answers, reconnection;
* :mod:`gateway.engine.remote_encoder` - the engine's model as a worker sees it, with its tokenizer;
* :mod:`gateway.engine.supervisor` - starts, restarts and drains the engine and the workers.
"""
