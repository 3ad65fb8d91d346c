"""The check behind the PDL chain tests: a chain of our kernels gives the same bits launched with programmatic
dependent launch as without, eager and replayed in a CUDA graph."""
import torch

from pagedbatch.engine import pdl


def assert_chain_under_pdl_gives_the_bits_without_pdl(chain, inputs, monkeypatch) -> None:
    """``chain``: one input tensor to one output tensor (CUDA); ``inputs``: tensors of one shape to run it on."""
    monkeypatch.setattr(pdl, "USE_PDL", False)
    refs = [chain(x) for x in inputs]
    monkeypatch.setattr(pdl, "USE_PDL", True)
    assert pdl.enabled("cuda")
    for x, ref in zip(inputs, refs):  # eager, PDL on
        assert torch.equal(chain(x), ref)
    static = inputs[0].clone()
    chain(static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    for _ in range(3):
        for x, ref in zip(inputs, refs):
            static.copy_(x)
            graph.replay()
            assert torch.equal(out, ref)
