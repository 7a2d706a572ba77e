"""Store admission: a minimum prompt length, and storing a prefix from its Nth sighting on."""

from prometheus_client import generate_latest

from kvshelf import Namespace
from kvshelf.config import AdmissionConfig
from kvshelf.keys import chunk_keys
from kvshelf.metrics import ShelfCounters, ShelfMetrics
from kvshelf.security import Keyring
from kvshelf.shelf.admission import Admission, SightingSketch
from tests.conftest import CHUNK_SIZE, LAYOUT

KEYRING = Keyring(bytes(range(32)))
NAMESPACE = Namespace("test-model@1", LAYOUT)
SHARED = list(range(100, 100 + 2 * CHUNK_SIZE))  # two chunks many prompts start with


def keys_of(token_ids: list[int]):
    return chunk_keys(token_ids, NAMESPACE, CHUNK_SIZE, keyring=KEYRING)


def admission(min_tokens: int = 0, min_sightings: int = 1) -> tuple[Admission, ShelfCounters]:
    counters = ShelfCounters()
    return Admission(AdmissionConfig(min_tokens, min_sightings), counters), counters


def test_by_default_everything_is_stored():
    policy, counters = admission()
    keys = keys_of(SHARED)
    assert policy.admitted(keys, len(SHARED)) == len(keys)
    assert counters.store_refused_chunks == {"min_tokens": 0, "min_sightings": 0}


def test_a_prompt_shorter_than_min_tokens_is_not_stored():
    policy, counters = admission(min_tokens=3 * CHUNK_SIZE)
    keys = keys_of(SHARED)
    assert policy.admitted(keys, len(SHARED)) == 0
    assert policy.admitted(keys, 3 * CHUNK_SIZE) == len(keys)  # the whole prompt is long enough
    assert counters.store_refused_chunks["min_tokens"] == len(keys)


def test_a_prefix_is_stored_from_its_nth_sighting_on():
    policy, counters = admission(min_sightings=3)
    keys = keys_of(SHARED)
    assert [policy.admitted(keys, len(SHARED)) for _ in range(4)] == [0, 0, 2, 2]
    assert counters.store_refused_chunks["min_sightings"] == 2 * len(keys)


def test_a_shared_prefix_earns_its_place_while_each_prompts_own_chunks_do_not():
    policy, counters = admission(min_sightings=2)
    first = SHARED + [1] * CHUNK_SIZE
    second = SHARED + [2] * CHUNK_SIZE
    assert policy.admitted(keys_of(first), len(first)) == 0
    assert policy.admitted(keys_of(second), len(second)) == 2  # the shared chunks, not the own one
    assert counters.store_refused_chunks["min_sightings"] == 3 + 1


def test_chunks_offered_later_count_on_their_own():
    """A chunked prefill offers a prompt's chunks over several steps; each is one sighting of each chunk."""
    policy, _ = admission(min_sightings=2)
    prompt = SHARED + [3] * CHUNK_SIZE
    keys = keys_of(prompt)
    assert [policy.admitted(keys[:2], len(prompt)), policy.admitted(keys[2:], len(prompt))] == [0, 0]
    assert policy.admitted(keys, len(prompt)) == 3


def test_counts_are_halved_so_old_sightings_fade():
    sketch = SightingSketch(width=1 << 16, halve_every=4)
    target, other = keys_of(SHARED)
    assert [int(sketch.add([target.digest])[0]) for _ in range(3)] == [1, 2, 3]
    sketch.add([other.digest])  # the 4th sighting: every count halves, 3 -> 1
    assert int(sketch.add([target.digest])[0]) == 2


def test_one_off_chunks_are_rarely_taken_for_repeats():
    """30k distinct chunks (about as many as the sketch sees between halvings) share its fixed 2 MiB."""
    sketch = SightingSketch()
    one_offs = [key.digest for key in keys_of(list(range(30_000 * CHUNK_SIZE)))]
    counts = [sketch.add(one_offs[start : start + 1000]) for start in range(0, len(one_offs), 1000)]
    assert sum(int((batch > 1).sum()) for batch in counts) <= 3  # at most 1 in 10,000


def test_refused_chunks_are_in_stats_and_prometheus():
    policy, counters = admission(min_tokens=10)
    policy.admitted(keys_of(SHARED[:CHUNK_SIZE]), CHUNK_SIZE)
    metrics = ShelfMetrics(counters, [])
    assert metrics.snapshot()["store_refused_chunks"] == {"min_tokens": 1, "min_sightings": 0}
    exposition = generate_latest(metrics.registry).decode()
    assert 'kvshelf_store_refused_chunks_total{rule="min_tokens"} 1.0' in exposition
    assert 'kvshelf_store_refused_chunks_total{rule="min_sightings"} 0.0' in exposition
