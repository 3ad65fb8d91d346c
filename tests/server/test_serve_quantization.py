"""``pagedbatch serve`` / ``api_server.py --quantization fp8`` reaches the engine's config."""
from click.testing import CliRunner

import pagedbatch.engine.llm_engine as llm_engine
from pagedbatch.server.cli import serve


def test_serve_passes_quantization_to_the_engine_config(monkeypatch, tmp_path):
    seen = []

    class Recorder:
        def __init__(self, config):
            seen.append(config)
            raise ValueError("stop before serving")

    monkeypatch.setattr(llm_engine, "LLMEngine", Recorder)
    r = CliRunner().invoke(serve, ["--model", str(tmp_path), "--quantization", "fp8", "--device", "cpu"])
    assert r.exit_code == 1 and "stop before serving" in r.output
    assert seen[0].quantization == "fp8"
    r = CliRunner().invoke(serve, ["--model", str(tmp_path), "--quantization", "int4"])
    assert r.exit_code == 2 and "Invalid value for '--quantization'" in r.output
