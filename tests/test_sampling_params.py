"""SamplingParams.n and the seeds of a request's samples."""
import pytest

from pagedbatch.sampling_params import SamplingParams, sample_seed


def test_sample_zero_keeps_the_seed_and_the_others_get_well_mixed_63_bit_seeds():
    assert sample_seed(1234, 0) == 1234
    seeds = {sample_seed(s, j) for s in (0, 1, 2, 2**63 - 1) for j in range(1, 65)}
    assert len(seeds) == 4 * 64  # distinct for neighbouring seeds and indices
    assert all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(7, 3) == sample_seed(7, 3)  # a rerun reproduces every sample
    # Mixed: neighbouring inputs differ in about half of the 63 bits.
    flips = [bin(sample_seed(5, j) ^ sample_seed(5, j + 1)).count("1") for j in range(1, 200)]
    assert 25 < sum(flips) / len(flips) < 38
    SamplingParams(seed=sample_seed(2**63 - 1, 9))  # always a valid seed


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_n_must_be_a_positive_integer_and_the_error_names_it(bad):
    with pytest.raises(ValueError, match=r"^n must be"):
        SamplingParams(n=bad)
    assert SamplingParams(n=3).n == 3 and SamplingParams().n == 1


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_numbers_are_refused_naming_the_field(name, value):
    # NaN compares false with every bound, so range checks alone let it through: a NaN temperature made
    # a job row of token 0 six times with no error.
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams.from_dict({name: value})
