"""Per-request traces: each request's kvshelf story, as one JSON log line and optionally as
OpenTelemetry spans.

With `metrics.trace: true` the shelf keeps a `RequestTrace` for each request it is told about
(`Shelf.locate/load/save_chunks` with a request id): what the lookup found in each tier and why
the rest missed, what was loaded (tokens, bytes per tier, seconds, why a load fell short), what
was stored. The engine says when the request is over (`Tracer.finish`); the trace then goes to
the `kvshelf.trace` logger as one line, `kvshelf trace {...}`, and, where `metrics.otlp_endpoint`
is set, as a `kvshelf.request` span with `kvshelf.lookup`, `kvshelf.load` and `kvshelf.save`
children, exported over OTLP/HTTP (`pip install kvshelf[otel]`). Traces name tenants by the keyed
tag of their salt and prompts by length only: never a token, never a salt.
"""

import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from kvshelf.errors import ConfigError

logger = logging.getLogger("kvshelf.trace")
MAX_OPEN_TRACES = 4096  # requests never finished (aborted before the engine said) go first beyond this


@dataclass(slots=True)
class Phase:
    """One timed step of a request: when it began and ended (ns since the epoch) and what it did."""

    start_ns: int
    end_ns: int
    attributes: dict


@dataclass(slots=True)
class RequestTrace:
    request_id: str
    tenant: str = "none"
    prompt_tokens: int = 0
    lookup_chunks: dict[str, int] = field(default_factory=dict)  # tier -> leading chunks it held
    hit_tokens: int = 0  # what the lookup found
    miss_reason: str | None = None  # why the lookup's first missing chunk was missing
    loaded_tokens: int = 0
    loaded_bytes: dict[str, int] = field(default_factory=dict)  # KV bytes by the tier they came from
    load_s: float = 0.0
    load_miss_reason: str | None = None  # why a load fell short of what the lookup found
    stored_chunks: int = 0
    stored_bytes: int = 0
    phases: dict[str, list[Phase]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> dict:
        summary = {name: getattr(self, name) for name in self.__slots__ if name != "phases"}
        summary["load_s"] = round(self.load_s, 6)
        return summary


class Tracer:
    """The open traces of one shelf; `enabled` False keeps none (nothing costs more than a check)."""

    def __init__(self, enabled: bool, otlp_endpoint: str | None = None, service_name: str = "kvshelf") -> None:
        self.enabled = enabled or otlp_endpoint is not None
        self._open: OrderedDict[str, RequestTrace] = OrderedDict()
        self._lock = threading.Lock()
        self._log_lines = enabled
        if enabled and not logger.handlers:
            # Engines configure their own loggers, not ours: the lines go to stderr whatever they set.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        self._otel, self._provider = _otel_tracer(otlp_endpoint, service_name) if otlp_endpoint else (None, None)

    def trace(self, request_id: str | None) -> RequestTrace | None:
        """The open trace of `request_id`, started now if new; None when tracing is off or no id."""
        if not self.enabled or request_id is None:
            return None
        with self._lock:
            found = self._open.get(request_id)
            if found is None:
                found = self._open[request_id] = RequestTrace(request_id)
                while len(self._open) > MAX_OPEN_TRACES:
                    self._open.popitem(last=False)
            return found

    def finish(self, request_id: str) -> RequestTrace | None:
        """The request is over: emit its trace (if one was kept) and forget it."""
        if not self.enabled:
            return None
        with self._lock:
            trace = self._open.pop(request_id, None)
        if trace is None:
            return None
        if self._log_lines:
            logger.info("kvshelf trace %s", json.dumps(trace.summary(), sort_keys=True))
        if self._otel is not None:
            self._export(trace)
        return trace

    def _export(self, trace: RequestTrace) -> None:
        phases = [phase for runs in trace.phases.values() for phase in runs]
        if not phases:
            return
        root = self._otel.start_span("kvshelf.request", start_time=min(phase.start_ns for phase in phases),
                                     attributes=_attributes(trace.summary()))
        context = _span_context(root)
        for name, runs in trace.phases.items():
            for phase in runs:
                span = self._otel.start_span(f"kvshelf.{name}", context=context, start_time=phase.start_ns,
                                             attributes=_attributes(phase.attributes))
                span.end(end_time=phase.end_ns)
        root.end(end_time=max(phase.end_ns for phase in phases))

    def close(self) -> None:
        """Export the spans still batched."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = self._otel = None


def now_ns() -> int:
    return time.time_ns()


def _attributes(values: dict) -> dict:
    """OpenTelemetry attributes: scalars as they are, mappings flattened (`loaded_bytes.disk`), None left out."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update({f"kvshelf.{name}.{inner}": inner_value for inner, inner_value in value.items()})
        elif value is not None:
            flat[f"kvshelf.{name}"] = value
    return flat


def _span_context(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def _otel_tracer(endpoint: str, service_name: str):
    """A tracer of its own provider (the process's global one is left to the engine), batching spans
    to `endpoint` (an OTLP/HTTP collector: http://host:4318/v1/traces)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"metrics.otlp_endpoint needs OpenTelemetry's SDK and OTLP exporter ({exc.name} is "
                          "missing): pip install 'kvshelf[otel]', or unset metrics.otlp_endpoint") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("kvshelf"), provider
