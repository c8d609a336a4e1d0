"""Fixtures of the `locmoe route` CLI tests (tests/cli/cases.cmake). Run with /usr/bin/python3 (numpy)."""
import os

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))

# 8 tokens x 4 experts; first choices 0 0 0 1 1 2 3 3, each token's logit at its choice rising with the
# token (1, 2, 3 for expert 0), so that capacity 2 drops token 2 under "position" and token 0 under "probs".
logits = np.zeros((8, 4), dtype=np.float32)
for t, (e, v) in enumerate([(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]):
    logits[t, e] = v
np.save(os.path.join(here, "logits_8x4.npy"), logits)
np.save(os.path.join(here, "token_rank_8.npy"), np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.int32))
np.save(os.path.join(here, "token_rank_7.npy"), np.zeros(7, dtype=np.int32))
np.save(os.path.join(here, "domain_8.npy"), np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int32))
np.save(os.path.join(here, "bias_4.npy"), np.array([0, 0, 0, 5], dtype=np.float32))
np.save(os.path.join(here, "expert_rank_4.npy"), np.array([1, 1, 0, 0], dtype=np.int32))
np.save(os.path.join(here, "hidden_8x16.npy"), np.arange(128, dtype=np.float32).reshape(8, 16) / 64)
# dL/d(weight) of each routed choice (`locmoe route --grad-weights`), [T, k] in routed_expert's order: binary
# fractions of both signs, exact in float32; the _nan copy has a NaN at token 5 (an error).
grad_weights_8x1 = np.array([[0.5], [-1.0], [0.25], [2.0], [-0.75], [1.5], [-0.5], [1.25]], dtype=np.float32)
np.save(os.path.join(here, "grad_weights_8x1.npy"), grad_weights_8x1)
np.save(os.path.join(here, "grad_weights_8x2.npy"),
        np.array([[0.5, -0.25], [-1.0, 0.75], [0.25, 1.5], [2.0, -0.5], [-0.75, -1.25], [1.5, 0.5], [-0.5, 1.0],
                  [1.25, -2.0]], dtype=np.float32))
grad_weights_nan = grad_weights_8x1.copy()
grad_weights_nan[5, 0] = np.nan
np.save(os.path.join(here, "grad_weights_nan_8x1.npy"), grad_weights_nan)
