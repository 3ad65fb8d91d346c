"""``pagedbatch serve`` / ``api_server.py`` options (``--quantization fp8``, ``--prefill-graph-max-tokens``)
reach the engine's config."""
from click.testing import CliRunner

import pagedbatch.engine.llm_engine as llm_engine
from pagedbatch.server.cli import serve


def _engine_config_of(monkeypatch, *args):
    """The EngineConfig ``serve *args`` builds (the engine stops the server at its start)."""
    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)
            raise ValueError("stop before serving")

    monkeypatch.setattr(llm_engine, "LLMEngine", Recorder)
    r = CliRunner().invoke(serve, list(args))
    assert r.exit_code == 1 and "stop before serving" in r.output
    return seen[-1]


def test_serve_passes_quantization_to_the_engine_config(monkeypatch, tmp_path):
    assert _engine_config_of(monkeypatch, "--model", str(tmp_path), "--quantization", "fp8",
                             "--device", "cpu").quantization == "fp8"
    r = CliRunner().invoke(serve, ["--model", str(tmp_path), "--quantization", "int4"])
    assert r.exit_code == 2 and "Invalid value for '--quantization'" in r.output


def test_serve_passes_the_prefill_graph_cap_to_the_engine_config(monkeypatch, tmp_path):
    assert _engine_config_of(monkeypatch, "--model", str(tmp_path), "--device", "cpu",
                             "--prefill-graph-max-tokens", "0").prefill_graph_max_tokens == 0
