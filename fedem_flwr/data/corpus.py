"""Load a multilingual corpus as a ``datasets.Dataset`` of four string columns: ``text``, ``language``,
``chat`` and ``domain``.

``text`` is what a language adapter trains on; every row has it. ``chat`` holds a conversation as
the JSON of its checked turns (``fedem_flwr.data.chat``), "" for a plain-text row; a conversation's ``text`` is
its contents joined by newlines, so it also serves its language's adapter. ``domain`` tags a row
("" when unknown) for adapters limited to one domain. Every source gives the same columns and types,
so corpora from several files concatenate.

Sources (``data.source``):

``chatterbot``
    The embedded demo corpus: the ``chatterbot-corpus`` package (28 languages of YAML dialogues, BSD),
    read offline from its installed folder. One row per conversation: a conversation (a question and
    its answers, joined by newlines) is the smallest unit that reads as a document; one row per line
    would give rows of a few bytes, and one row per file would leave small languages (Telugu, Thai:
    one file each) a single row, too few to hold any out or to spread over nodes. Its lines are the
    turns of a chat, user and assistant in turn starting with the user (a single line is no chat);
    the domain is the file's name (``greetings``, ``health``).

``files``
    A contributor's local data, ``data.paths`` listing files or folders (a folder means every
    supported file inside it, recursively, in sorted order). By extension:

    * ``.json`` / ``.jsonl``, ``.parquet``, ``.csv``, ``.tsv``: one row per document, with a text
      column and a language column (``data.text_column``, default ``text``, and
      ``data.language_column``, default ``language``). A row with a value in ``data.messages_column``
      (default ``messages``: a list of ``{"role", "content"}`` turns or its JSON) is a conversation,
      and a table of conversations needs no text column. ``data.domain_column`` (default ``domain``)
      is optional. Other columns are ignored.
    * ``.txt``: one language per file, named by the file: ``<name>.<lang>.txt`` or ``<lang>.txt``
      (``wiki.hi.txt``, ``te.txt``). One row per paragraph (blank-line separated).

    Languages are ISO 639-1 codes where one exists (``en``, ``hi``, ``te``; BCP 47 tags such as
    ``zh-Hant`` otherwise); English language names (``Hindi``) are accepted and mapped to codes.

``hub``
    ``datasets.load_dataset(data.hub_id, split=data.hub_split)`` (``HF_ENDPOINT`` selects the
    endpoint), with the same columns as the files.

``data.languages`` keeps only the named languages. Empty texts are dropped. Every failure a user can
cause (a missing file, a missing column, an unnamed language) raises ``DataError`` naming it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import datasets
import yaml

from fedem_flwr.config.schema import DataConfig
from fedem_flwr.data.chat import conversation_text, parse_messages
from fedem_flwr.errors import DataError

log = logging.getLogger(__name__)

TEXT = "text"
LANGUAGE = "language"
CHAT = "chat"  # the conversation's turns as JSON; "" for a plain-text row
DOMAIN = "domain"  # "" when unknown
FEATURES = datasets.Features({name: datasets.Value("string") for name in (TEXT, LANGUAGE, CHAT, DOMAIN)})

# chatterbot-corpus folder -> language code. Hinglish (Hindi in Latin script) and traditional
# Chinese have no ISO 639-1 code of their own: BCP 47 script subtags keep them apart.
CHATTERBOT_LANGUAGES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
    "hebrew": "he", "hindi": "hi", "hinglish": "hi-Latn", "indonesian": "id", "italian": "it",
    "japanese": "ja", "korean": "ko", "marathi": "mr", "oriya": "or", "persian": "fa",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta",
    "telugu": "te", "thai": "th", "traditionalchinese": "zh-Hant", "turkish": "tr",
    "ukrainian": "uk", "urdu": "ur", "yoruba": "yo",
}
# A few more English names, so a contributor's "Kannada" column works too.
_EXTRA_NAMES = {
    "arabic": "ar", "farsi": "fa", "gujarati": "gu", "kannada": "kn", "malayalam": "ml",
    "nepali": "ne", "odia": "or", "punjabi": "pa", "sanskrit": "sa", "sinhala": "si",
    "swahili": "sw", "vietnamese": "vi",
}
_NAME_TO_CODE = {**CHATTERBOT_LANGUAGES, **_EXTRA_NAMES}
_CODE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")

# The C loader (libyaml) parses the corpus several times faster when PyYAML was built with it.
_YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)

TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
TEXT_SUFFIXES = (".txt",)


def load_corpus(cfg: DataConfig) -> datasets.Dataset:
    """The corpus ``cfg`` names, as rows of (``text``, ``language``, ``chat``, ``domain``), filtered to
    ``cfg.languages``."""
    if cfg.source == "chatterbot":
        ds = _load_chatterbot()
    elif cfg.source == "files":
        ds = _load_files(cfg)
    elif cfg.source == "hub":
        ds = _load_hub(cfg)
    else:  # DataConfig.__post_init__ already refuses other values
        raise DataError(f"`data.source` is {cfg.source!r}; allowed: 'chatterbot', 'files', 'hub'.")
    ds = ds.filter(lambda row: bool(row[TEXT].strip()))
    if cfg.languages:
        ds = select_languages(ds, cfg.languages)
    if len(ds) == 0:
        raise DataError(f"the corpus from `data.source` {cfg.source!r} has no text.")
    return ds


def select_languages(ds: datasets.Dataset, languages: Iterable[str]) -> datasets.Dataset:
    """Keep the rows of ``languages`` (codes or English names); every one must be present."""
    wanted = {normalize_language(lang, where="`data.languages`") for lang in languages}
    present = set(ds.unique(LANGUAGE))
    missing = sorted(wanted - present)
    if missing:
        raise DataError(
            f"`data.languages` names {missing}, absent from the corpus; it holds {sorted(present)}."
        )
    return ds.filter(lambda row: row[LANGUAGE] in wanted)


def language_sizes(ds: datasets.Dataset) -> dict[str, int]:
    """UTF-8 bytes of text per language, largest first (ties by code)."""
    sizes: dict[str, int] = {}
    for text, lang in zip(column(ds, TEXT), column(ds, LANGUAGE)):
        sizes[lang] = sizes.get(lang, 0) + len(text.encode("utf-8"))
    return dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))


def corpus_digest(ds: datasets.Dataset) -> str:
    """sha256 of the corpus's (language, text) rows, whatever their order: changes when any text does."""
    rows = sorted(
        hashlib.sha256(f"{lang}\x00{text}".encode("utf-8")).digest()
        for text, lang in zip(column(ds, TEXT), column(ds, LANGUAGE))
    )
    return hashlib.sha256(b"".join(rows)).hexdigest()


def column(ds: datasets.Dataset, name: str) -> list:
    """A column as a Python list, through Arrow (``ds[name]`` is a lazy, slowly iterated view)."""
    return ds.with_format("arrow")[name].to_pylist()


def normalize_language(value: object, *, where: str) -> str:
    """A language code from a code or an English name; ``where`` names the source in errors."""
    text = str(value).strip() if value is not None else ""
    name = text.lower().replace(" ", "").replace("_", "")
    if name in _NAME_TO_CODE:
        return _NAME_TO_CODE[name]
    if not _CODE.match(text):
        raise DataError(
            f"{where}: language {value!r} is neither a language code (e.g. 'hi', 'zh-Hant') "
            "nor a known English language name."
        )
    primary, *rest = text.split("-")
    return "-".join([primary.lower(), *rest])


def chatterbot_root() -> Path:
    """The installed chatterbot-corpus data folder."""
    try:
        import chatterbot_corpus
    except ImportError as err:
        raise DataError(
            "`data.source` is 'chatterbot' but the `chatterbot-corpus` package is not installed "
            "(pip install chatterbot-corpus==1.3.3)."
        ) from err
    return Path(chatterbot_corpus.__file__).parent / "data"


@functools.lru_cache(maxsize=1)
def _load_chatterbot() -> datasets.Dataset:
    # Cached: the package never changes while a process runs, and a Dataset is immutable.
    root = chatterbot_root()
    rows: dict[str, list[str]] = {name: [] for name in FEATURES}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        code = CHATTERBOT_LANGUAGES.get(folder.name)
        if code is None:
            log.warning("chatterbot-corpus folder %r has no language code; skipped", folder.name)
            continue
        for path in sorted(folder.glob("*.yml")):
            for lines in _conversations(path):
                rows[TEXT].append("\n".join(lines))
                rows[LANGUAGE].append(code)
                rows[CHAT].append(_chat_json(_alternating_turns(lines)) if len(lines) > 1 else "")
                rows[DOMAIN].append(path.stem)
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def _conversations(path: Path) -> list[list[str]]:
    """The non-empty stripped lines of each conversation of a chatterbot YAML file."""
    # BaseLoader keeps every scalar a string: safe_load would turn an answer "Yes" into True and
    # "22" into 22. It builds only str, list and dict, so it is as safe as safe_load.
    with path.open(encoding="utf-8") as f:
        doc = yaml.load(f, Loader=_YAML_LOADER) or {}
    out = []
    for conv in doc.get("conversations") or []:
        lines = conv if isinstance(conv, list) else [conv]  # a few entries are a bare string
        kept = [line.strip() for line in lines if isinstance(line, str) and line.strip()]
        if kept:
            out.append(kept)
    return out


def _alternating_turns(lines: list[str]) -> list[dict[str, str]]:
    """A chatterbot dialogue as chat turns: the user opens, then the assistant and the user in turn."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": line} for i, line in enumerate(lines)]


def _chat_json(turns: list[dict[str, str]]) -> str:
    return json.dumps(turns, ensure_ascii=False)


def _expand(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and (p.suffix.lower() in TABLE_FORMATS or p.suffix.lower() in TEXT_SUFFIXES)
            )
            if not found:
                raise DataError(
                    f"`data.paths` folder {str(path)!r} holds no .txt, .json, .jsonl, .parquet, "
                    ".csv or .tsv file."
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"`data.paths`: data file {str(path)!r} does not exist.")
    return files


def _load_files(cfg: DataConfig) -> datasets.Dataset:
    parts = []
    for path in _expand(cfg.paths):
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            parts.append(_load_text_file(path))
        elif suffix in TABLE_FORMATS:
            parts.append(_load_table(path, cfg))
        else:
            raise DataError(
                f"`data.paths`: {str(path)!r} has an unsupported extension {suffix!r}; use .txt "
                "(named <name>.<lang>.txt), .json, .jsonl, .parquet, .csv or .tsv."
            )
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _load_text_file(path: Path) -> datasets.Dataset:
    stem_parts = path.name[: -len(path.suffix)].split(".")
    lang = stem_parts[-1]
    try:
        code = normalize_language(lang, where=f"`data.paths` file {str(path)!r}")
    except DataError as err:
        raise DataError(
            f"`data.paths`: cannot tell the language of {str(path)!r}; name a text file "
            "<name>.<lang>.txt or <lang>.txt (e.g. wiki.hi.txt), or use JSON/Parquet/CSV with a "
            "language column."
        ) from err
    ds = _load_dataset("text", path, sample_by="paragraph")
    return ds.map(
        lambda row: {TEXT: row[TEXT].strip(), LANGUAGE: code, CHAT: "", DOMAIN: ""},
        remove_columns=ds.column_names, features=FEATURES,
    )


def _load_table(path: Path, cfg: DataConfig) -> datasets.Dataset:
    kwargs = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    ds = _load_dataset(TABLE_FORMATS[path.suffix.lower()], path, **kwargs)
    return _normalize_columns(ds, cfg, f"`data.paths` file {str(path)!r}")


def _load_dataset(builder: str, path: Path, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # a library error deep inside datasets: name the file instead
        raise DataError(f"`data.paths`: cannot read {str(path)!r} as {builder}: {err}") from err


def _load_hub(cfg: DataConfig) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(cfg.hub_id, split=cfg.hub_split)
    except Exception as err:  # offline, unknown id, unknown split: all name the dataset
        raise DataError(
            f"`data.hub_id` {cfg.hub_id!r} (split {cfg.hub_split!r}) cannot be loaded: {err}"
        ) from err
    return _normalize_columns(ds, cfg, f"`data.hub_id` {cfg.hub_id!r}")


def _normalize_columns(ds: datasets.Dataset, cfg: DataConfig, where: str) -> datasets.Dataset:
    """``ds``'s rows as the corpus's four columns; ``where`` names the source in errors."""
    columns = ds.column_names
    if cfg.language_column not in columns:
        raise DataError(
            f"{where} has no column {cfg.language_column!r} (`data.language_column`); columns found: {columns}."
        )
    if cfg.text_column not in columns and cfg.messages_column not in columns:
        raise DataError(
            f"{where} has no column {cfg.text_column!r} (`data.text_column`) nor {cfg.messages_column!r} "
            f"(`data.messages_column`); columns found: {columns}."
        )
    codes = {value: normalize_language(value, where=where) for value in ds.unique(cfg.language_column)}

    def rows(batch: dict[str, list], indices: list[int]) -> dict[str, list[str]]:
        n = len(indices)
        texts = batch.get(cfg.text_column, [None] * n)
        messages = batch.get(cfg.messages_column, [None] * n)
        domains = batch.get(cfg.domain_column, [None] * n)
        out: dict[str, list[str]] = {TEXT: [], CHAT: [], LANGUAGE: [codes[v] for v in batch[cfg.language_column]]}
        for index, text, value in zip(indices, texts, messages):
            if value is None or (isinstance(value, (str, list)) and not value):
                out[TEXT].append("" if text is None else str(text))
                out[CHAT].append("")
                continue
            turns = parse_messages(value, where=f"{where} row {index}, column {cfg.messages_column!r}")
            out[TEXT].append(conversation_text(turns))
            out[CHAT].append(_chat_json(turns))
        out[DOMAIN] = ["" if d is None else str(d).strip() for d in domains]
        return out

    return ds.map(rows, batched=True, with_indices=True, remove_columns=columns, features=FEATURES)
