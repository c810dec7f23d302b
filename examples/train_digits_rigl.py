"""Train a 90%-sparse CNN on scikit-learn's digits with RigL, in a plain PyTorch loop.

    python examples/train_digits_rigl.py
"""

import torch
import torch.nn.functional as F

from sparsetorch.training import RigL, Sparsifier
from sparsetorch.training.demo import digits_data
from sparsetorch.training.toys import DigitsCNN

steps = 600
x_train, y_train, x_test, y_test = digits_data()
torch.manual_seed(0)
model = DigitsCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
# ERK gives small layers more weights; masks move every 20 steps until 75% of training.
sparsifier = Sparsifier(model, RigL(sparsity=0.9, end=steps * 3 // 4, every=20), distribution="erk", optimizer=optimizer)

for _step in range(steps):
    index = torch.randint(0, len(y_train), (64,))
    F.cross_entropy(model(x_train[index]), y_train[index]).backward()
    optimizer.step()
    sparsifier.step()  # after optimizer.step(), before zero_grad(): RigL reads the dense gradients
    optimizer.zero_grad()

model.eval()
accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.3f}")
for name, sparsity in sparsifier.sparsity().items():
    print(f"  {name:6s} sparsity {sparsity:.1%}")
torch.save(model.state_dict(), "digits_rigl.pt")  # masks are in the state dict: <layer>.weight_mask
