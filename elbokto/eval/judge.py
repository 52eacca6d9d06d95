"""A pairwise LLM judge behind any OpenAI-compatible chat-completions endpoint.

:class:`PairwiseJudge` asks the judge model one question per (prompt, answer A, answer B), with
bounded concurrency, a timeout per call and retries with exponential backoff. Its answer must name
exactly one verdict (``[[A]]``, ``[[B]]`` or ``[[C]]``, see :func:`parse_verdict`); an answer that
does not is asked again, then recorded as an error — never read as a tie.

Failures, and what becomes of them:

- rate limits (429), server errors (5xx), timeouts: retried; still failing after the retries, the
  item is an error of this run (not cached: a later run asks again);
- an unparseable answer: asked again; still unparseable, the item is an error and is cached (it was
  paid for);
- connection refused, unknown host, bad key, unknown model: the run stops with a ValueError.

Every finished judgment is appended to a :class:`JudgmentCache` as soon as it arrives, keyed by
(prompt, answer A, answer B, judge model, template text): an interrupted or repeated run asks only
what it has no answer for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from elbokto.durable import append_lines
from elbokto.eval.template import render
from elbokto.requires import require

logger = logging.getLogger(__name__)

_VERDICT = re.compile(r"\[\[([ABC])\]\]")


@dataclass
class JudgeConfig:
    """Which judge answers and how it is called (`elbokto eval winrate` flags)."""

    judge_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Judge model name (e.g. gpt-4o-mini). Give it twice (--judge_model a "
            "--judge_model b) for two judges and Cohen's kappa between them.",
            "action": "append",
        },
    )
    judge_base_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1); "
            "default: OpenAI's. The key comes from OPENAI_API_KEY."
        },
    )
    judge_template: str | None = field(
        default=None,
        metadata={
            "help": "A text file with {question}, {answer_a} and {answer_b} slots; default: the "
            "packaged MT-Bench pairwise template."
        },
    )
    judge_concurrency: int = field(default=8, metadata={"help": "Judge calls in flight at once."})
    judge_timeout: float = field(default=120.0, metadata={"help": "Seconds per judge call."})
    judge_max_retries: int = field(
        default=5,
        metadata={
            "help": "Retries of a call that timed out, was rate-limited (429) or failed (5xx)."
        },
    )
    judge_parse_retries: int = field(
        default=2,
        metadata={
            "help": "Times an answer without exactly one verdict is asked again before it is "
            "recorded as an error."
        },
    )
    judge_backoff: float = field(
        default=1.0,
        metadata={"help": "First retry delay in seconds; doubles at each retry (at most 60 s)."},
    )
    judge_max_tokens: int = field(default=1024, metadata={"help": "Judge answer length cap."})
    judge_temperature: float = field(default=0.0, metadata={"help": "Judge sampling temperature."})

    def __post_init__(self) -> None:
        # --judge_model appends one list per occurrence; a plain list of names stays as it is.
        names = [self.judge_model] if isinstance(self.judge_model, str) else self.judge_model
        self.judge_model = [
            n for item in names for n in ([item] if isinstance(item, str) else item)
        ]
        for name in ("judge_concurrency", "judge_max_retries", "judge_parse_retries"):
            value = getattr(self, name)
            if value < (1 if name == "judge_concurrency" else 0):
                raise ValueError(
                    f"{name}={value}; expected an integer >= "
                    f"{1 if name == 'judge_concurrency' else 0}"
                )
        if self.judge_timeout <= 0 or self.judge_backoff < 0:
            raise ValueError(
                f"judge_timeout={self.judge_timeout}, judge_backoff="
                f"{self.judge_backoff}; expected > 0 and >= 0"
            )


def parse_verdict(text: str | None) -> str | None:
    """ "A", "B" or "C" when the answer names exactly one distinct verdict (``[[A]]`` ...), else
    None (no verdict, or conflicting ones)."""
    found = set(_VERDICT.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def judgment_key(question: str, answer_a: str, answer_b: str, judge: str, template: str) -> str:
    """sha256 of everything a judgment depends on."""
    blob = json.dumps([question, answer_a, answer_b, judge, template], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Append-only JSON lines ``{"key", "judge", "verdict", "error", "answer"}``; the last line of
    a key wins. Thread-safe appends, fsynced line by line (:func:`elbokto.durable.append_lines`).
    ``path=None`` keeps the records in memory only (a caller that stores its results elsewhere)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A line cut by an interrupted write: its judgment is simply asked again.
                    logger.warning("%s:%d: unreadable judgment line skipped", self.path, number)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def put(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._records[record["key"]] = record
            if self.path is not None:
                append_lines(self.path, [line])


@dataclass
class Judgment:
    """One pairwise judgment: ``verdict`` "A" / "B" / "C", or None with ``error`` saying why;
    ``answer`` is the judge's last text; ``cached``: read from the cache, no call made;
    ``transient``: the error was a timeout, rate limit or server error that outlasted the retries
    (not cached: a later run asks again)."""

    verdict: str | None
    error: str | None = None
    answer: str | None = None
    cached: bool = False
    transient: bool = False


class _Transient(Exception):
    """A failure worth a retry whose last occurrence makes the item an error."""


class PairwiseJudge:
    """One judge model asked through an OpenAI-compatible client.

    Args:
        config: endpoint, timeouts, retries, concurrency.
        model: the judge model name.
        template: the template text (:func:`elbokto.eval.template.load_template`).
        cache: where finished judgments are read and appended.
        client: an ``openai.OpenAI``-like client; default: one for ``config.judge_base_url`` with
            the key from ``OPENAI_API_KEY`` (a placeholder for a local server that needs none).
    """

    def __init__(
        self, config: JudgeConfig, model: str, template: str, cache: JudgmentCache, client=None
    ) -> None:
        self.config, self.model, self.template, self.cache = config, model, template, cache
        self.client = client or _client(config)
        self.calls = 0  # HTTP requests made (retries included), for logs and tests
        self._calls_lock = threading.Lock()
        self._stop = threading.Event()  # set when the run must stop: in-flight calls give up

    def judge(self, items: Sequence[tuple[str, ...]]) -> list[Judgment]:
        """Judgments of (question, answer A, answer B) items, in order; cached ones are not asked.
        (A subclass's items may be shorter: the pointwise judge's are (question, answer).)

        Raises ValueError (and stops the pending calls) when the judge cannot be reached or
        refuses the key or the model; judgments finished until then are in the cache."""
        results: list[Judgment | None] = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            record = self.cache.get(self._key(item))
            if record is None:
                todo.append(i)
            else:
                results[i] = Judgment(
                    record["verdict"], record.get("error"), record.get("answer"), cached=True
                )
        if todo:
            logger.info(
                "judge %s: %d judgments to ask, %d cached",
                self.model,
                len(todo),
                len(items) - len(todo),
            )
        with ThreadPoolExecutor(self.config.judge_concurrency) as pool:
            futures = {pool.submit(self._judge_one, items[i]): i for i in todo}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
            except BaseException:
                self._stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        done: list[Judgment] = []
        for judgment in results:
            assert judgment is not None  # every item is cached or asked; a failed ask raised above
            done.append(judgment)
        return done

    # What an answer without a verdict is recorded as; a judge of another kind (pointwise) changes
    # it with its verdict parser, :meth:`_parse`.
    _no_verdict = "no single [[A]]/[[B]]/[[C]] verdict in the answer"

    def _key(self, item: tuple[str, ...]) -> str:
        question, answer_a, answer_b = item  # a pairwise item; a pointwise judge overrides this
        return judgment_key(question, answer_a, answer_b, self.model, self.template)

    def _parse(self, answer: str | None) -> str | None:
        return parse_verdict(answer)

    def _judge_one(self, item: tuple[str, ...]) -> Judgment:
        message = render(self.template, *item)
        answer = None
        try:
            for _ in range(self.config.judge_parse_retries + 1):
                answer = self._ask(message)
                verdict = self._parse(answer)
                if verdict is not None:
                    judgment = Judgment(verdict, answer=answer)
                    break
            else:
                judgment = Judgment(None, error=self._no_verdict, answer=answer)
        except _Transient as e:
            return Judgment(None, error=str(e), answer=answer, transient=True)
        self.cache.put(
            {
                "key": self._key(item),
                "judge": self.model,
                "verdict": judgment.verdict,
                "error": judgment.error,
                "answer": judgment.answer,
            }
        )
        return judgment

    def _ask(self, message: str) -> str | None:
        """The judge's text for one message, retrying what is transient."""
        openai = require("openai", "the pairwise judge")

        config = self.config
        for attempt in range(config.judge_max_retries + 1):
            if self._stop.is_set():
                raise _Transient("cancelled: the run stopped")
            with self._calls_lock:
                self.calls += 1
            unreachable, retry_after = None, None
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": message}],
                    temperature=config.judge_temperature,
                    max_tokens=config.judge_max_tokens,
                )
                return response.choices[0].message.content if response.choices else None
            except openai.APITimeoutError:  # a subclass of APIConnectionError: caught first
                failure = f"timed out after {config.judge_timeout:g} s"
            except openai.APIConnectionError as e:
                failure, unreachable = _short(e), e
            except (
                openai.AuthenticationError,
                openai.PermissionDeniedError,
                openai.NotFoundError,
            ) as e:
                raise ValueError(
                    f"the judge at {_where(config)} refused model {self.model!r}: "
                    f"HTTP {e.status_code} {_short(e)}"
                ) from None
            except (openai.RateLimitError, openai.InternalServerError) as e:
                failure, retry_after = f"HTTP {e.status_code} {_short(e)}", _retry_after(e)
            except openai.APIStatusError as e:  # another 4xx: this item only
                raise _Transient(f"HTTP {e.status_code} {_short(e)}") from None
            if attempt < config.judge_max_retries:
                delay = config.judge_backoff * 2**attempt if retry_after is None else retry_after
                time.sleep(min(60.0, delay))
        if unreachable is not None:
            raise ValueError(f"the judge at {_where(config)} is unreachable: {failure}")
        raise _Transient(f"{failure} (after {config.judge_max_retries} retries)")


def require_judge(config: JudgeConfig) -> None:
    if not config.judge_model:
        raise ValueError(
            "no judge: pass --judge_model (e.g. gpt-4o-mini), and --judge_base_url "
            "for a server other than OpenAI's"
        )


def check_reachable(config: JudgeConfig, client=None) -> None:
    """ValueError unless a judge is named and its endpoint answers (any HTTP answer to a model
    listing will do, except a refused key): checked before hours of sampling, not after."""
    openai = require("openai", "the pairwise judge")

    require_judge(config)
    client = client or _client(config)
    try:
        client.models.list()
    except openai.APITimeoutError:
        pass  # it answers slowly: the calls' own timeouts and retries deal with that
    except openai.APIConnectionError as e:
        raise ValueError(f"the judge at {_where(config)} is unreachable: {_short(e)}") from None
    except openai.AuthenticationError as e:
        raise ValueError(f"the judge at {_where(config)} refused the key: {_short(e)}") from None
    except openai.APIStatusError:
        pass  # e.g. no /models route: the server is there


def _client(config: JudgeConfig):
    openai = require("openai", "the pairwise judge")

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if config.judge_base_url is None:
            raise ValueError(
                "no judge API key: set OPENAI_API_KEY, or pass --judge_base_url for "
                "a server that needs none"
            )
        key = "none"  # the client insists on a key; a keyless local server ignores it
    return openai.OpenAI(
        base_url=config.judge_base_url, api_key=key, timeout=config.judge_timeout, max_retries=0
    )


def _where(config: JudgeConfig) -> str:
    return config.judge_base_url or "the OpenAI API"


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _retry_after(error) -> float | None:
    """Seconds from a Retry-After header, if the server sent one."""
    try:
        return float(error.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None
