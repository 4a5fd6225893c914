"""Code the tests share, one module per area, imported as ``from helpers.moe import make_layer``
(pyproject's pytest ``pythonpath`` puts tests/ on the path):

    oracle        the independent float64 MoE reference (knows nothing of xmoe)
    moe           layers, the oracle run on a layer's own weights, gradient collection
    gpt, mt, hf   tiny models and routing recorders for the GPT, translation and transformers tests
    data          small deterministic text
    distributed   the code spawned ranks run (gloo on 127.0.0.1)
"""
