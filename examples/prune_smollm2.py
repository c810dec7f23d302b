"""Prune the bundled SmolLM2-135M to 2:4 with SparseGPT and compare perplexity.

    python examples/prune_smollm2.py
"""

import sparsetorch
from sparsetorch.data import calibration_windows, demo_text, evaluation_windows
from sparsetorch.evaluate.perplexity import perplexity
from sparsetorch.formats import save_pruned
from sparsetorch.models import load_model

model, tokenizer, _ = load_model()  # the bundled model; or load_model("./my-llama")
text = demo_text()  # Shakespeare: calibration plays / held-out plays
calibration = calibration_windows(tokenizer, text.calibration, samples=32, seqlen=512)
held_out = evaluation_windows(tokenizer, text.evaluation, tokens=8192, seqlen=512)

dense = perplexity(model, held_out)
report = sparsetorch.prune(model, calibration, method="sparsegpt", pattern="2:4")
sparse = perplexity(model, held_out)
print(f"perplexity dense {dense:.2f} -> 2:4 {sparse:.2f}, sparsity {report.sparsity:.1%}")
save_pruned(model, "smollm2-2of4", report.to_dict(), tokenizer=tokenizer, overwrite=True)
