"""Quantised embeddings (Cohere's ``embedding_types``), bit for bit as sentence-transformers makes them.

``binary`` and ``ubinary`` are the signs of the float vector packed eight dimensions to a byte
(``np.packbits(x > 0)``, the last byte padded with zero bits), ``binary`` minus 128 as a signed
byte: ``quantize_embeddings(x, "binary" | "ubinary")`` exactly.

``int8`` and ``uint8`` cut each dimension's range into 256 steps. sentence-transformers takes the
range of each dimension from the batch it is given unless told ``ranges``: then a text's codes
depend on the other texts of its request, and codes from two requests cannot be compared. Here the
ranges are calibrated once per model (:class:`Calibrator`): the dense vectors of a fixed set of
texts (:data:`CALIBRATION_TEXTS`, plain and with each instruction prompt the model would apply),
each dimension's minimum and maximum over them, the first calibration of the model's cache
namespace shared by every replica through the cache. Every request is then quantised with the same
ranges, as ``quantize_embeddings(x, "int8" | "uint8", ranges=ranges)`` does, bit for bit; a value
outside its dimension's range is clipped to the first or last step.

Pure numpy, no web framework: the HTTP routes (:mod:`gateway.http.routes.cohere`) call it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import numpy as np
import xxhash

from encoder import InputTooLongError
from gateway.core.cache import CacheUnavailableError, cache_key
from gateway.core.errors import OutputNotSupportedError, OverloadedError
from gateway.core.outputs import DENSE, shorten
from gateway.core.prompts import PromptBook
from gateway.core.service import EmbeddingService

__all__ = [
    "CALIBRATION_INPUT_TYPES",
    "CALIBRATION_TENANT",
    "CALIBRATION_TEXTS",
    "CALIBRATION_VERSION",
    "Calibrated",
    "Calibrator",
    "Precision",
    "calibration_key",
    "quantize",
    "ranges_of",
]

logger = logging.getLogger(__name__)

Precision = Literal["int8", "uint8", "binary", "ubinary"]

# Raised whenever CALIBRATION_TEXTS or the way ranges are taken changes: codes made with another
# version's ranges are not comparable (GET /v2/embed/ranges shows the version and a digest).
CALIBRATION_VERSION = 1
CALIBRATION_TENANT = "calibration"  # the encoder queue's tenant for calibration passes
# the input types whose prompts are calibrated too (with the model's default prompt)
CALIBRATION_INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")
_CHUNK = 32  # texts tokenised at once to leave out those over the limit (no truncation)

# A fixed, varied set: questions and passages, short and long, prose, code, numbers, lists, many
# topics and several languages and scripts, each short enough for any model's limit (a text over
# the model's limit on a server that does not truncate is left out of calibration).
CALIBRATION_TEXTS: tuple[str, ...] = (
    "how do I reset my password",
    "What is the capital of Australia?",
    "best way to cache embeddings in redis",
    "symptoms of vitamin D deficiency",
    "python list comprehension with two loops",
    "why is the sky blue",
    "cheap flights from Berlin to Lisbon in March",
    "how many grams of protein in an egg",
    "difference between TCP and UDP",
    "who wrote the Brothers Karamazov",
    "kubernetes pod stuck in CrashLoopBackOff",
    "is it safe to run a dishwasher overnight",
    "meaning of the word serendipity",
    "how to make sourdough starter from scratch",
    "what does HTTP status 429 mean",
    "treatment options for plantar fasciitis",
    "convert 72 fahrenheit to celsius",
    "when did the Berlin Wall fall",
    "Rust borrow checker error: cannot borrow as mutable",
    "tax deductions for home office",
    "The mitochondria is the powerhouse of the cell, producing most of its supply of ATP.",
    "Canberra was chosen as the capital of Australia in 1908 as a compromise between Sydney and Melbourne.",
    "Redis keeps each vector for a week under a key made of the model fingerprint and the text.",
    "Vitamin D deficiency can cause fatigue, bone pain, muscle weakness and mood changes.",
    "A list comprehension may hold several for clauses; they nest from left to right.",
    "Rayleigh scattering makes shorter wavelengths of sunlight scatter more strongly in the atmosphere.",
    "Our spring sale takes 20% off every flight to Portugal booked before the end of the month.",
    "One large egg contains about six grams of protein, most of it in the white.",
    "TCP guarantees ordered delivery with retransmission; UDP sends datagrams without any guarantee.",
    "Fyodor Dostoevsky finished The Brothers Karamazov in 1880, a few months before his death.",
    "The container exits with code 137 because it was killed after using more memory than its limit.",
    "Modern dishwashers have overflow protection, but running them while you sleep still carries a small risk.",
    "Serendipity is the occurrence of events by chance in a happy or beneficial way.",
    "Mix equal weights of flour and water, cover loosely, and feed it every day for about a week.",
    "The server answers 429 Too Many Requests when a client exceeds its rate limit; retry after the delay given.",
    "Stretching the calf and the arch of the foot twice a day relieves most cases within months.",
    "Subtract 32 and multiply by five ninths: 72 degrees Fahrenheit is about 22.2 degrees Celsius.",
    "On 9 November 1989 the border crossings in Berlin opened and crowds began to tear down the wall.",
    "You cannot borrow `v` as mutable because it is also borrowed as immutable by the iterator.",
    "A room used regularly and exclusively for work may let self-employed people deduct part of their rent.",
    "def mean(values):\n    return sum(values) / len(values)",
    "SELECT user_id, COUNT(*) FROM orders WHERE created_at > NOW() - INTERVAL '7 days' GROUP BY user_id;",
    "for (let i = 0; i < items.length; i++) { total += items[i].price * items[i].qty; }",
    'curl -X POST http://localhost:8001/v1/embeddings -d \'{"input": "hello"}\'',
    "git rebase -i HEAD~3 lets you squash the last three commits into one.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)",
    "ERROR 2024-03-14T09:12:44Z worker-3 connection reset by peer (retrying in 5s)",
    "<div class='card'><h2>Order summary</h2><p>3 items, total $42.50</p></div>",
    "Invoice #48213 - due 30 days net - amount: 1,284.00 EUR - VAT 19%",
    "Q3 revenue grew 14% year over year to $2.3 billion, beating analyst estimates.",
    "The patient, a 54-year-old man, presented with chest pain radiating to the left arm.",
    "Take one tablet by mouth twice daily with food for ten days.",
    "The tenant shall give the landlord no less than thirty days' written notice before vacating.",
    "This agreement is governed by the laws of the State of New York.",
    "Preheat the oven to 200 C. Roast the vegetables with olive oil, salt and thyme for 35 minutes.",
    "Whisk two eggs with a splash of milk, pour into a hot buttered pan and stir gently.",
    "Great battery life and a bright screen, but the speakers are tinny and it gets warm.",
    "Terrible customer service. I waited three weeks for a refund that never came.",
    "Five stars! The shoes fit perfectly and were comfortable from the first day.",
    "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours, dishwasher safe.",
    "Wireless noise-cancelling headphones with 30-hour battery and USB-C fast charging.",
    "Just missed the last train home again. Walking it is.",
    "can't believe it's snowing in april lol",
    "Congratulations to the team on shipping the new release!",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The derivative of sin(x) is cos(x), and the integral of 1/x is ln|x| + C.",
    "Let G be a finite group and H a subgroup; then the order of H divides the order of G.",
    "Black holes form when massive stars collapse under their own gravity at the end of their lives.",
    "Plate tectonics explains earthquakes, volcanoes and the slow drift of the continents.",
    "The French Revolution began in 1789 with the storming of the Bastille.",
    "The Silk Road linked China with the Mediterranean for more than fifteen centuries.",
    "Impressionist painters tried to capture light and movement rather than fine detail.",
    "The symphony opens with a slow introduction before the strings state the main theme.",
    "In the final minute the striker curled the ball into the top corner to win the match 2-1.",
    "The marathon route follows the river before climbing into the old town.",
    "Interest rates rose for the fourth time this year as the central bank fought inflation.",
    "A diversified index fund spreads risk across hundreds of companies at low cost.",
    "Climate models project more frequent heat waves and heavier rainfall by mid-century.",
    "Bees pollinate about a third of the crops we eat.",
    "The Amazon rainforest produces a large share of the world's oxygen and stores vast amounts of carbon.",
    "Elections will be held in November; polls open at 7 a.m. and close at 8 p.m.",
    "The committee approved the budget after a six-hour debate.",
    "Please find attached the minutes of Tuesday's meeting and the updated project plan.",
    "Hi Sam, can we move our call to Thursday afternoon? Something came up.",
    "Dear customer, your package has been shipped and will arrive within 3-5 business days.",
    "Chapter 1. It was a cold morning when the letter finally arrived.",
    "She opened the door slowly, afraid of what she might find on the other side.",
    "Once upon a time a small dragon lived in a cave above the village.",
    "Terms: 1) free returns within 30 days; 2) items must be unused; 3) refunds take 5 days.",
    "Ingredients: flour, sugar, butter, eggs, baking powder, vanilla, a pinch of salt.",
    "Step 1: unplug the router. Step 2: wait thirty seconds. Step 3: plug it back in.",
    "42",
    "3.14159 2.71828 1.41421 1.61803",
    "2023-11-05",
    "OK",
    "Thanks!",
    "N/A",
    "#machinelearning #ai #datascience",
    "john.doe@example.com +1 (555) 123-4567",
    "Wie spät ist es in Tokio?",
    "Die Katze schläft auf dem warmen Fensterbrett in der Sonne.",
    "Où se trouve la gare la plus proche ?",
    "Le gouvernement a annoncé une réforme des retraites très contestée.",
    "¿Cuál es la mejor época para visitar Patagonia?",
    "El museo abre de martes a domingo de diez a seis.",
    "Qual è la ricetta tradizionale della carbonara?",
    "O Brasil é o maior produtor de café do mundo.",
    "Hoe laat vertrekt de laatste trein naar Amsterdam?",
    "Jak się masz? Mam nadzieję, że wszystko w porządku.",
    "Сколько стоит билет на поезд до Санкт-Петербурга?",
    "Москва является крупнейшим городом Европы по численности населения.",
    "如何在家里制作酸奶？",  # noqa: RUF001
    "北京是中国的首都，也是一座历史悠久的城市。",  # noqa: RUF001
    "東京で一番おいしいラーメン屋はどこですか？",  # noqa: RUF001
    "今日はとても良い天気ですね。",
    "서울에서 부산까지 기차로 얼마나 걸려요?",
    "ما هي عاصمة المغرب؟",
    "يعتبر النيل أطول نهر في العالم.",
    "भारत की राजधानी नई दिल्ली है।",
    "İstanbul iki kıtaya yayılan tek büyük şehirdir.",  # noqa: RUF001
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",  # noqa: RUF001
    "Hà Nội là thủ đô của Việt Nam.",
    "Ninapenda kusoma vitabu jioni.",
    "עברית נכתבת מימין לשמאל.",
    "ภาษาไทยมีวรรณยุกต์ห้าเสียง",
    "Embeddings map text to vectors so that similar meanings end up close together.",
    "A cross-encoder reads the query and the document together and outputs one relevance score.",
    "Quantising float32 vectors to int8 cuts their memory by four with little loss in recall.",
    "Binary embeddings keep only the sign of each dimension and compare with the Hamming distance.",
)


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """Each dimension's minimum and maximum over ``vectors``: shape (2, dim), float32, as
    sentence-transformers' ``quantize_embeddings`` takes ``ranges``."""
    stacked = np.asarray(vectors, dtype=np.float32)
    return np.vstack((stacked.min(axis=0), stacked.max(axis=0))).astype(np.float32)


def quantize(vectors: np.ndarray, precision: Precision, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (n, dim) at ``precision``, equal to sentence-transformers'
    ``quantize_embeddings(vectors.astype(float32), precision, ranges=ranges)`` bit for bit.

    int8 and uint8 need ``ranges`` (see :func:`ranges_of`): 256 steps from each dimension's minimum
    to its maximum, ``floor((x - min) / step)`` clipped to 0..255 (int8: minus 128). binary and
    ubinary pack the signs (``x > 0``) eight dimensions a byte; binary is that byte minus 128."""
    x = np.asarray(vectors, dtype=np.float32)
    if precision in ("binary", "ubinary"):
        bits = np.packbits(x > 0, axis=-1)
        return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    if ranges is None:
        raise ValueError(f"{precision} needs calibrated ranges")
    bounds = np.asarray(ranges, dtype=np.float32)
    starts = bounds[0, :]
    steps = (bounds[1, :] - starts) / np.float32(255)
    steps = np.where(steps == 0, np.float32(1), steps)
    codes = np.clip(np.floor((x - starts) / steps), 0, 255)
    return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)


@dataclass(frozen=True, slots=True)
class Calibrated:
    """One model's calibration at one width: ``ranges`` (2, width) and what it was made of."""

    ranges: np.ndarray
    texts: int  # calibration vectors the ranges span (texts x prompts, those within the model's limit)
    prompts: tuple[str, ...]  # the prompt names calibrated beside the plain texts
    namespace: str  # the model's cache namespace when calibrated (another model: calibrated anew)
    digest: str  # xxh3-64 of the ranges' little-endian float32 bytes: equal digests, comparable codes

    @property
    def version(self) -> int:
        return CALIBRATION_VERSION


@dataclass(slots=True)
class _Vectors:
    namespace: str
    matrix: np.ndarray  # the calibration vectors at the model's full width
    prompts: tuple[str, ...]
    widths: dict[int, Calibrated] = field(default_factory=dict)


class _Shared(msgspec.Struct, array_like=True, frozen=True):
    """A calibration as the cache keeps it for every replica of the model (the first one stored wins)."""

    version: int
    prompts: list[str]
    rows: int
    dim: int
    digest: str  # xxh3-64 of ``vectors``
    vectors: bytes  # rows x dim, little-endian float32, exactly as calibrated


def _encode(vectors: _Vectors) -> bytes:
    data = np.ascontiguousarray(vectors.matrix, dtype="<f4").tobytes()
    rows, dim = vectors.matrix.shape
    shared = _Shared(CALIBRATION_VERSION, list(vectors.prompts), rows, dim, xxhash.xxh3_64_hexdigest(data), data)
    return msgspec.msgpack.encode(shared)


def _decode(blob: bytes, namespace: str, dim: int) -> _Vectors | None:
    """The stored calibration, or None when it is not one this model can use (logged)."""
    try:
        shared = msgspec.msgpack.decode(blob, type=_Shared)
    except msgspec.DecodeError as exc:
        logger.warning("the stored int8/uint8 calibration is unreadable (%s); using this process's", exc)
        return None
    if (
        shared.version != CALIBRATION_VERSION
        or shared.dim != dim
        or shared.rows < 1
        or len(shared.vectors) != shared.rows * dim * 4
        or xxhash.xxh3_64_hexdigest(shared.vectors) != shared.digest
    ):
        logger.warning("the stored int8/uint8 calibration does not fit this model; using this process's")
        return None
    matrix = np.frombuffer(shared.vectors, dtype="<f4").reshape(shared.rows, dim).astype(np.float32)
    return _Vectors(namespace, matrix, tuple(shared.prompts))


class Calibrator:
    """The int8/uint8 ranges of one model, calibrated on first use and kept.

    Every replica, worker and restart of a model (one cache namespace) uses the first calibration
    stored in the cache (:func:`calibration_key`), adopted without encoder work; finding none, a
    calibrator calibrates, stores its vectors with ``put_first`` (``SET NX``) and adopts what the
    cache then holds, so two replicas calibrating at once both use the first one stored. Without a
    cache, or when it fails, the process keeps its own, made deterministic: each calibration text is
    computed alone, one after another (a batch's padding and size change a vector's last bits),
    through the model's service (cache, micro-batcher, tenant :data:`CALIBRATION_TENANT`). An
    asyncio lock makes concurrent first requests wait for one calibration. A shorter width's ranges
    (``output_dimension``) come from the same full-width vectors, cut and re-normalised as the
    answer's are. A model whose namespace changes is calibrated anew."""

    def __init__(self, service: EmbeddingService, prompts: PromptBook) -> None:
        self.service, self.prompts = service, prompts
        self._lock = asyncio.Lock()
        self._vectors: _Vectors | None = None

    @property
    def calibrated(self) -> bool:
        """Whether ranges are held for the model as it is now (no pass needed to answer)."""
        return self._vectors is not None and self._vectors.namespace == self.service.namespace

    async def ranges(self, width: int) -> Calibrated:
        """The ranges for vectors of ``width`` dimensions (the model's, or an ``output_dimension``)."""
        vectors = self._vectors
        if vectors is None or vectors.namespace != self.service.namespace:
            async with self._lock:
                vectors = self._vectors
                if vectors is None or vectors.namespace != self.service.namespace:
                    vectors = await self._shared()
                    self._vectors = vectors
        found = vectors.widths.get(width)
        if found is None:
            rows = shorten(list(vectors.matrix), width)
            ranges = ranges_of(np.stack(rows))
            digest = xxhash.xxh3_64_hexdigest(np.ascontiguousarray(ranges, dtype="<f4").tobytes())
            found = Calibrated(ranges, len(vectors.matrix), vectors.prompts, vectors.namespace, digest)
            vectors.widths[width] = found
        return found

    async def _shared(self) -> _Vectors:
        """The namespace's stored calibration, else this process's, stored first-wins and read back."""
        cache, namespace, dim = self.service.cache, self.service.namespace, self.service.encoder.dim
        if cache is None:
            return await self._calibrate()
        key = calibration_key(self.service.cache_prefix, namespace)
        try:
            stored = (await cache.get_blobs([key]))[0]
        except CacheUnavailableError as exc:
            logger.debug("reading the stored int8/uint8 calibration failed: %s", exc)
            stored = None
        found = _decode(stored, namespace, dim) if stored is not None else None
        if found is not None:
            return found
        local = await self._calibrate()
        if local.namespace != namespace:  # the model changed while reading: not this namespace's to share
            return local
        try:
            stored = await cache.put_first(key, _encode(local))
        except CacheUnavailableError as exc:
            logger.warning("sharing the int8/uint8 calibration failed (%s): this process keeps its own", exc)
            return local
        found = _decode(stored, namespace, dim) if stored is not None else None
        return found if found is not None else local

    def _prompt_names(self) -> tuple[str, ...]:
        names = [self.prompts.name_for(None, kind) for kind in CALIBRATION_INPUT_TYPES]
        names.append(self.prompts.default_name)
        return tuple(dict.fromkeys(name for name in names if name is not None))

    async def _calibrate(self) -> _Vectors:
        namespace = self.service.namespace
        names = self._prompt_names()
        texts = list(CALIBRATION_TEXTS)
        for name in names:
            texts.extend(self.prompts.prepend(list(CALIBRATION_TEXTS), name))
        if not self.service.truncate:
            chunks = [texts[start : start + _CHUNK] for start in range(0, len(texts), _CHUNK)]
            texts = [text for chunk in chunks for text in await self._within_limit(chunk)]
        rows = []
        for text in texts:  # one at a time: a vector of its own pass, and one text in the queue at once
            result = await self.service.embed([text], DENSE, tenant=CALIBRATION_TENANT)
            rows.append(np.asarray(result.values[0], dtype=np.float32))
        if not rows:
            raise OutputNotSupportedError(
                "int8 and uint8 need calibration, and no calibration text fits this model's input limit",
                param="embedding_types",
            )
        if self.service.namespace != namespace:  # the engine changed models meanwhile: two models' vectors
            raise OverloadedError("the model changed while int8/uint8 ranges were calibrated; retry", retry_after=1)
        return _Vectors(namespace, np.stack(rows), names)

    async def _within_limit(self, chunk: Sequence[str]) -> list[str]:
        """``chunk`` without the texts over the model's limit (a server that does not truncate)."""
        kept = list(chunk)
        while kept:
            try:
                await self.service.batcher.tokenize(kept, truncate=False)
            except InputTooLongError as exc:
                del kept[exc.index]
                continue
            break
        return kept


def calibration_key(prefix: str, namespace: str) -> str:
    """Where the cache keeps a namespace's shared calibration (``cache stats`` shows its kind as
    ``calibration``, and ``cache purge`` of the namespace removes it with the vectors)."""
    return cache_key(prefix, namespace + ":calibration", f"v{CALIBRATION_VERSION}")
