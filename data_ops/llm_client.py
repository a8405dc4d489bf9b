"""The one client for the OpenAI-compatible chat endpoints the data jobs call: speech-QA generation
(`data_ops.sqa`) and the evaluation judge (`data_ops.scoring`).

It is the `openai` package's client, whose retries (connection errors, timeouts, 408/409/429 and 5xx, exponential
backoff with jitter, `Retry-After` honoured) are what a hand-written loop would re-implement. Every failure it
gives up on becomes an `EndpointError` naming the endpoint; a 200 without a usable message is an empty reply,
which the callers count as malformed.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ChatEndpoint:
    """An OpenAI-compatible chat endpoint. The key is read from the environment variable `api_key_env` by the
    job's driver and handed to its actors (never logged, never part of the config file)."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_retries: int = 4


class EndpointError(RuntimeError):
    pass


class ChatClient:
    """`complete(prompt, system=None) -> str` against one endpoint; one HTTP connection pool per client."""

    def __init__(self, endpoint: ChatEndpoint, api_key: str | None = None):
        from openai import OpenAI

        self.endpoint = endpoint
        # servers without auth (vLLM, a local proxy) ignore the key; the client refuses to start without one
        self.client = OpenAI(base_url=endpoint.base_url, api_key=api_key or "no-key",
                             max_retries=endpoint.max_retries, timeout=endpoint.timeout_s)

    def complete(self, prompt: str, system: str | None = None) -> str:
        import openai

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            reply = self.client.chat.completions.create(model=self.endpoint.model, messages=messages,
                                                        temperature=self.endpoint.temperature,
                                                        max_tokens=self.endpoint.max_tokens)
        except openai.APIResponseValidationError:
            return ""
        except openai.APIError as e:  # connection, timeout, status errors: after the client's own retries
            raise EndpointError(f"{self.endpoint.base_url}: gave up after {self.endpoint.max_retries + 1} attempts: "
                                f"{type(e).__name__}: {e}") from None
        try:
            return reply.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return ""  # a 200 without a usable message counts as a malformed answer
