"""The model side of the embedding gateway: texts in, vectors out.

Knows torch and transformers, and nothing of HTTP, Redis or msgspec::

    from encoder import load_encoder

    encoder = load_encoder("BAAI/bge-m3", device="auto")
    vectors = encoder.embed(["hello", "world"])  # float32, shape (2, 1024), L2-normalised
"""

from encoder.device import DeviceNotAvailableError, resolve_device, resolve_dtype
from encoder.loading import load_encoder
from encoder.model import Encoder, InputTooLongError
from encoder.model_files import ModelNotFoundError
from encoder.packing import plan_batches

__all__ = [
    "DeviceNotAvailableError",
    "Encoder",
    "InputTooLongError",
    "ModelNotFoundError",
    "load_encoder",
    "plan_batches",
    "resolve_device",
    "resolve_dtype",
]
