"""The test suite's own run policy (tests/conftest.py, ``RunPolicy``), on tiny throwaway suites run in-process
by pytester: only ``gpu`` tests may skip; a full run (``KEELTUNE_FULL_RUN=1``, as scripts/test.sh sets it when
called without arguments, or pytest without test paths or selecting options) fails when anything else is
deselected, however; a hand-picked subset still runs; a test using the Slurm cluster fixture must be marked."""

from __future__ import annotations

import pytest

from tests.conftest import FULL_RUN_ENV

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_plain():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_on_a_gpu():
    pass
"""

CONFTEST = """
import pytest

from tests.conftest import pytest_configure  # noqa: F401  (the policy under test)

@pytest.fixture(scope="session")
def slurm_cluster():
    return "a cluster"
"""

INI = """
[pytest]
testpaths = .
markers =
    gpu: needs a GPU
    slow: slow
    slurm: needs the cluster
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv(FULL_RUN_ENV, raising=False)  # scripts/test.sh sets it for the outer run
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_a_full_run_with_only_gpu_tests_skipped_or_deselected_passes(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.runpytest().assert_outcomes(passed=2, skipped=1)
    monkeypatch.setenv(FULL_RUN_ENV, "1")
    result = suite.runpytest("-m", "not gpu")
    result.assert_outcomes(passed=2, deselected=1)
    assert result.ret == 0 and "run policy" not in result.stdout.str()


def test_a_full_run_with_a_non_gpu_skip_fails_naming_it(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_skips="import pytest\n\ndef test_skipped():\n    pytest.skip('no database here')\n")
    result = suite.runpytest()
    result.assert_outcomes(passed=2, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*run policy: 1 violation(s), the run fails*",
            "*skipped, not a gpu test: test_skips.py::test_skipped (no database here)",
        ]
    )


def test_a_module_skipped_at_collection_fails_a_full_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_gone="import pytest\n\npytest.skip('no slurm here', allow_module_level=True)\n")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*skipped, not a gpu test: test_gone.py (skipped at collection: no slurm here)"]
    )


def test_a_deselection_fails_a_full_run_from_wherever_it_comes(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FULL_RUN_ENV, "1")  # scripts/test.sh without arguments: -m on its command line
    result = suite.runpytest("-m", "not slow")
    result.assert_outcomes(passed=1, skipped=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*-m 'not slow'*", "*deselected in a full run, not a gpu test: test_suite.py::test_slow"]
    )
    monkeypatch.delenv(FULL_RUN_ENV)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-k 'not slow'")  # hidden in the environment of a plain `pytest`
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*deselected in a full run, not a gpu test: test_suite.py::test_slow"])


def test_a_subset_picked_by_hand_still_runs(suite: pytest.Pytester) -> None:
    for args in (
        ("-m", "not slow"),
        ("-k", "plain"),
        ("test_suite.py::test_plain",),
        ("--deselect", "test_suite.py::test_slow"),
    ):
        result = suite.runpytest(*args)
        assert result.ret == 0 and "run policy" not in result.stdout.str(), (args, result.stdout.str())


def test_a_test_using_the_cluster_without_the_slurm_marker_stops_the_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_cluster="""
import pytest

@pytest.fixture
def job(slurm_cluster):
    return slurm_cluster

@pytest.mark.slurm
def test_marked(slurm_cluster):
    pass

def test_unmarked(slurm_cluster):
    pass

def test_through_a_fixture(job):
    pass
"""
    )
    result = suite.runpytest("-m", "not slurm")  # even when it would not run
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*2 test(s) use the local Slurm cluster (slurm_cluster, or in tests/slurm/) without the `slurm` marker*",
            "*test_cluster.py::test_unmarked",
            "*test_cluster.py::test_through_a_fixture",
        ]
    )
    suite.makepyfile(
        test_cluster="import pytest\n\npytestmark = pytest.mark.slurm\n\ndef test_marked(slurm_cluster):\n    pass\n"
    )
    suite.runpytest().assert_outcomes(passed=3, skipped=1)
