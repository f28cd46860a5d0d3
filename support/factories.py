"""Model folders built on the fly: nothing is downloaded from a model hub in tests or benchmarks.

``build_bge_m3_like`` writes a randomly initialised XLM-RoBERTa with bge-m3's files (modules.json,
CLS pooling, 8192 tokens, normalisation, ``colbert_linear.pt`` and ``sparse_linear.pt``) and a
small sentencepiece-style tokenizer trained on a few multilingual lines. Speed does not depend on
the weights, so with ``layers=24, hidden=1024`` it has bge-m3's compute shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

SAMPLE_LINES = [
    "The quick brown fox jumps over the lazy dog while the cache keeps every vector warm.",
    "Embeddings turn text into points in space, and similar meanings land close together.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。向量缓存让重复的文本不再计算。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από το τεμπέλικο σκυλί.",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "Numbers 0123456789, punctuation !?.,;:()[]{} and emoji 🙂🚀 belong in the vocabulary too.",
]


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A Unigram tokenizer with XLM-R's special tokens at XLM-R's ids (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    tokenizer.train_from_iterator(SAMPLE_LINES * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=8192,
    )


def build_bge_m3_like(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer_from: Path | None = None,
) -> Path:
    """Write a bge-m3-shaped model folder with random weights to ``folder`` and return it.

    ``tokenizer_from`` copies a real tokenizer (e.g. all-MiniLM-L6-v2's WordPiece) so that token
    counts per word are realistic, for benchmarks; by default a small Unigram one is trained.
    """
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from)) if tokenizer_from else build_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=8194,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), folder / "colbert_linear.pt")
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), folder / "sparse_linear.pt")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    return folder


def mixed_texts(count: int, seed: int = 0, long_every: int = 10) -> list[str]:
    """Deterministic texts in several scripts; every ``long_every``-th one runs past 256 tokens."""
    import random

    rng = random.Random(seed)
    texts = []
    for i in range(count):
        words = 400 if long_every and i % long_every == 0 else rng.choice([2, 5, 12, 30, 60, 120])
        pieces: list[str] = []
        while sum(len(p.split()) for p in pieces) < words:
            pieces.append(rng.choice(SAMPLE_LINES))
        texts.append(" ".join(pieces))
    return texts


QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def build_decoder_tokenizer(vocab_size: int = 400, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like Qwen3-Embedding's: no BOS, the EOS ``<|endoftext|>``
    appended by the post-processor (that token is what last-token pooling reads), and the padding
    side of the caller's choice (Qwen3's tokenizer pads on the left)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SAMPLE_LINES * 4, trainer=trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
        model_max_length=32768,
    )


def build_decoder_embedder(
    folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, padding_side: str = "left"
) -> Path:
    """A Qwen3-Embedding-shaped sentence-transformers folder with random weights: a causal decoder,
    last-token pooling, normalisation, and a query instruction prompt (the default is none, as
    Qwen3-Embedding ships it: documents go in as they are)."""
    from transformers import Qwen3Config, Qwen3Model

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_decoder_tokenizer(padding_side=padding_side)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    Qwen3Model(config).save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": QUERY_INSTRUCTION, "document": ""}, "default_prompt_name": None})
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_lasttoken": True, "include_prompt": True})
    )
    return folder


def build_cross_encoder(
    folder: Path,
    *,
    tokenizer_from: Path,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    num_labels: int = 1,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """A reranker folder as sentence-transformers' ``CrossEncoder`` loads it: a BERT sequence
    classifier with random weights (``num_labels`` logits) and the WordPiece tokenizer of
    ``tokenizer_from`` (real token counts; its pairs carry token type ids)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # scores spread over (0, 1), not all near 0.5: comparisons can fail
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder
