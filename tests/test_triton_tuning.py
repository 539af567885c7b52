"""The run-time configuration choice of the masked-convolution kernels (kernels/tuning.py)."""
import pytest

tuning = pytest.importorskip("attenuation_triton.tuning", reason="triton cannot be imported")
from triton.runtime.errors import OutOfResources  # noqa: E402


def test_bucket_is_the_next_power_of_two():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 64, 65, 511)] == [0, 1, 2, 4, 64, 128, 512]


def _configs():
    return [tuning.Config(16 * i, 16, 16) for i in (1, 2, 3, 4)]


def test_tuner_times_every_config_once_per_key_and_launches_the_fastest():
    configs = _configs()
    fake_ms = {configs[0]: 3.0, configs[1]: 1.0, configs[2]: 2.0}   # configs[3] does not fit

    def time_ms(fn):
        fn()
        return fake_ms[launched[-1]]

    def launch(config):
        launched.append(config)
        if config is configs[3]:
            raise OutOfResources(1 << 20, 1 << 16, "shared memory")

    launched = []
    tuner = tuning.Tuner(configs, time_ms)
    assert tuner.launch(("conv", 64), launch) == configs[1]
    assert launched == configs + [configs[1]]          # each timed once, then the winner launched
    launched.clear()
    assert tuner.launch(("conv", 64), launch) == configs[1]
    assert launched == [configs[1]]                    # same key: no timing again
    launched.clear()
    tuner.launch(("conv", 128), launch)
    assert len(launched) == len(configs) + 1           # a new key is tuned


def test_tuner_says_when_nothing_fits():
    def launch(config):
        raise OutOfResources(1 << 20, 1 << 16, "shared memory")
    with pytest.raises(RuntimeError, match="no kernel configuration fits"):
        tuning.Tuner(_configs(), lambda fn: fn()).launch("key", launch)


def test_tuner_tries_only_the_configs_that_fit_the_problem():
    configs = _configs()                                   # block_m 16, 32, 48, 64
    timed = []

    def time_ms(fn):
        fn()
        return 1.0 / timed[-1].block_m                     # bigger tiles are "faster"

    tuner = tuning.Tuner(configs, time_ms)
    chosen = tuner.launch("small", timed.append, fits=lambda c: c.block_m <= 32)
    assert chosen == configs[1] and timed[:-1] == configs[:2]
    timed.clear()
    chosen = tuner.launch("none fits", timed.append, fits=lambda c: False)
    assert chosen == configs[3] and timed[:-1] == configs  # then every config is tried
