"""The columns of a fused-step coefficient row, as csrc/include/fastddpm/step.h numbers them (the
extensions export theirs as layout()["coef_columns"]; tests/test_layout.py asserts they agree).

Every step is x0 = a_x x_t + a_m m, clipped to [-clip, clip] if clip > 0, then
x_prev = c_x0 x0 + d_x x_t + d_m m + h1 x0_prev + h2 x0_prev2 + sigma z; schedulers.py fills the rows."""

COEF_COLUMNS = ("ax", "am", "cx0", "dx", "dm", "sigma", "clip", "pad", "h1", "h2", "pad2", "pad3")
COEF_WIDTH = len(COEF_COLUMNS)
A_X, A_M, C_X0, D_X, D_M, SIGMA, CLIP, PAD, H1, H2 = range(10)
