"""Train a tiny character-level GPT on Shakespeare with 2:4 sparsity from scratch (SR-STE).

    python examples/train_gpt_srste.py
"""

import torch
import torch.nn.functional as F

from sparsetorch.training import SRSTE, Sparsifier
from sparsetorch.training.demo import char_corpus
from sparsetorch.training.toys import TinyGPT

steps, batch, context = 300, 32, 64
corpus = char_corpus()  # training plays / held-out plays (Hamlet, Macbeth, Othello)
torch.manual_seed(0)
model = TinyGPT(len(corpus.vocab), width=128, layers=4, heads=4, context=context)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
sparsifier = Sparsifier(model, SRSTE(), pattern="2:4")  # every Linear but lm_head; masks from |w| every step


def windows(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.stack([ids[s : s + context + 1] for s in starts.tolist()])


for step in range(steps):
    chunk = windows(corpus.train, torch.randint(0, corpus.train.numel() - context - 1, (batch,)))
    loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    sparsifier.step()
    optimizer.zero_grad()
    if step % 50 == 0:
        print(f"step {step:4d}  train loss {loss.item():.3f}")

masks = sparsifier.finalize()  # plain Linear weights with exact 2:4 zeros
model.eval()
with torch.no_grad():
    held_out = windows(corpus.val, torch.arange(0, 64 * 1000, 1000))
    val = F.cross_entropy(model(held_out[:, :-1]).flatten(0, 1), held_out[:, 1:].flatten()).item()
block = model.blocks[0].fc.weight
print(f"validation loss {val:.3f}; block 0 fc keeps {int((block != 0).sum())} of {block.numel()} weights (2 of every 4)")
