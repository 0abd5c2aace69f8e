"""mfac_linalg.testing: the oracles are exact (against rational arithmetic), the
strategies draw what they promise, and check_operator catches broken operators."""
import copy
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mfac_linalg as ml
from mfac_linalg import testing as mt

EPS = np.finfo(np.float64).eps


# -- exact rational references -----------------------------------------------------------

def _frac(A):
    return [[Fraction(float(v)) for v in row] for row in np.atleast_2d(A)]


def _solve_frac(A, b):
    """Gaussian elimination in exact rationals."""
    n = len(A)
    M = [row[:] + [b[i]] for i, row in enumerate(A)]
    for c in range(n):
        p = next(r for r in range(c, n) if M[r][c] != 0)
        M[c], M[p] = M[p], M[c]
        for r in range(n):
            if r != c and M[r][c] != 0:
                f = M[r][c] / M[c][c]
                M[r] = [a - f * b_ for a, b_ in zip(M[r], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


def _det_frac(A):
    n = len(A)
    M = [row[:] for row in A]
    det = Fraction(1)
    for c in range(n):
        p = next(r for r in range(c, n) if M[r][c] != 0)
        if p != c:
            M[c], M[p] = M[p], M[c]
            det = -det
        det *= M[c][c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            M[r] = [a - f * b_ for a, b_ in zip(M[r], M[c])]
    return det


def _fisher_frac(G, lam, N=None):
    m, d = G.shape
    N = m if N is None else N
    Gf = _frac(G)
    lf = Fraction(lam)
    return [[(lf if i == j else 0) + sum(Gf[k][i] * Gf[k][j] for k in range(m)) / N
             for j in range(d)] for i in range(d)]


def _ulps(got, exact):
    """Distance in units of the last place of the correctly rounded value."""
    return max(abs(g - float(e)) / max(math.ulp(float(e)), 5e-324) for g, e in zip(got, exact))


# -- oracles -------------------------------------------------------------------------------

def test_refined_solve_is_correctly_rounded_on_hilbert():
    n = 6
    H = np.array([[1.0 / (i + j + 1) for j in range(n)] for i in range(n)])   # cond ~ 1.5e7
    b = np.arange(1.0, n + 1)
    Y = mt.refined_solve(lambda Y: H @ Y, lambda R: np.linalg.solve(H, R), b[:, None])
    exact = _solve_frac(_frac(H), [Fraction(v) for v in b])
    assert _ulps(Y[:, 0], exact) <= 1.0
    plain = np.linalg.solve(H, b)
    assert _ulps(plain, exact) > 1.0     # the point of refinement


@pytest.mark.parametrize("m,d,lam,dup", [(3, 5, 1e-3, False), (8, 4, 1e-12, True),
                                         (6, 6, 1e-9, True), (1, 3, 1.0, False)])
def test_inverse_fisher_oracle_is_exact(m, d, lam, dup):
    rng = np.random.default_rng(m * 10 + d)
    G = rng.standard_normal((m, d))
    if dup:
        G = G[np.arange(m) % 2]                     # rank 2: F's smallest eigenvalue is lam
    o = mt.inverse_fisher_oracle(G, lam)
    F = _fisher_frac(G, lam)
    x = rng.standard_normal(d)
    exact = _solve_frac(F, [Fraction(v) for v in x])
    assert _ulps(o.matmat(x), exact) <= 1.0
    # the forward product: exact to one rounding
    Fx = [sum(F[i][j] * Fraction(x[j]) for j in range(d)) for i in range(d)]
    assert _ulps(o.fisher.matmat(x), Fx) <= 0.5
    det = _det_frac(F)
    ld = math.log(float(det))           # float(Fraction) is correctly rounded
    assert abs(o.logdet - ld) <= 8 * EPS * max(1.0, abs(ld))
    # a dense float64 inverse is not this exact when F is ill-conditioned
    if lam <= 1e-9:
        dense = np.linalg.solve(np.array([[float(v) for v in r] for r in F]), x)
        assert _ulps(dense, exact) > 1e3


def test_kronecker_oracle_matches_rational_solve():
    rng = np.random.default_rng(3)
    P = rng.standard_normal((2, 2))
    P = P @ P.T
    Q = rng.standard_normal((3, 3))
    Q = Q @ Q.T
    P2, Q2 = np.diag([1.0, -0.5]), np.diag([0.3, 0.2, 0.1])
    o = mt.kronecker_oracle([(P, Q), (P2, Q2)], shift=1e-6)
    M = np.kron(P, Q) + np.kron(P2, Q2) + 1e-6 * np.eye(6)
    Mf = [[Fraction(0)] * 6 for _ in range(6)]
    for Pt, Qt in ((P, Q), (P2, Q2)):
        Pf, Qf = _frac(Pt), _frac(Qt)
        for i in range(6):
            for j in range(6):
                Mf[i][j] += Pf[i // 3][j // 3] * Qf[i % 3][j % 3]
    for i in range(6):
        Mf[i][i] += Fraction(1e-6)
    x = rng.standard_normal(6)
    exact = _solve_frac(Mf, [Fraction(v) for v in x])
    assert _ulps(o.matmat(x), exact) <= 1.0
    assert np.allclose(o.fisher.dense(), M, rtol=0, atol=4 * EPS * np.abs(M).max())
    # the layout: (P kron Q) vec(V) = vec(P V Q^T), row-major
    V = rng.standard_normal((2, 3))
    fwd = mt.kronecker_oracle([(P, Q)], inverse=False)
    assert np.allclose(fwd.matmat(V.reshape(-1)), (P @ V @ Q.T).reshape(-1), rtol=1e-14)


def test_block_diag_oracle():
    a = mt.Oracle.from_dense(np.array([[2.0, 1.0], [1.0, 2.0]]))
    b = mt.inverse_fisher_oracle(np.ones((1, 3)), 0.5)
    o = mt.block_diag_oracle([a, b])
    D = o.dense()
    assert D.shape == (5, 5) and np.array_equal(D[:2, :2], a.dense())
    assert np.array_equal(D[2:, 2:], b.dense()) and not D[:2, 2:].any()
    assert o.logdet == pytest.approx(math.log(3) + b.logdet, rel=1e-15)
    assert o.kappa == max(a.kappa, b.kappa)


def test_oracle_validates_its_input():
    with pytest.raises(ValueError, match="square"):
        mt.Oracle.from_dense(np.ones((2, 3)))
    with pytest.raises(ValueError, match="grads must be 2-D"):
        mt.inverse_fisher_oracle(np.ones(3), 0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        mt.inverse_fisher_oracle(np.ones((2, 3)), 0.0)


# -- strategies ----------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.data())
def test_gradient_matrices_draw_each_kind(data):
    kind = data.draw(st.sampled_from(["tall", "single", "duplicates", "zero_rows", "lowrank",
                                      "scaled", "normal"]))
    G = data.draw(mt.gradient_matrices(max_m=6, max_d=5, kinds=(kind,)))
    m, d = G.shape
    assert G.dtype == np.float64 and np.isfinite(G).all() and 1 <= d <= 5
    if kind == "tall":
        assert m > d
    if kind == "single":
        assert m == 1
    if kind == "duplicates" and m > 1:
        assert len({r.tobytes() for r in G}) <= max(1, m // 2)
    if kind == "lowrank":
        assert np.linalg.matrix_rank(G) <= min(m, d)


def test_gradient_matrices_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="kinds"):
        mt.gradient_matrices(kinds=("weird",))


@given(mt.fisher_problems(max_m=6, max_d=8, ratio=(1e-6, 1e1)))
def test_static_operator_passes_check_operator(problem):
    """The property test a user would write: any gradients, any damping in range."""
    G, lam = problem
    op = ml.StaticInverseFisher(G, lam)
    oracle = mt.inverse_fisher_oracle(G, lam)
    if op.form == "primal":
        oracle.kappa = _cond(G, lam)
    mt.check_operator(op, oracle, methods=("matvec", "matmat", "diagonal", "entry",
                                            "quad", "logdet", "fisher"))


def _cond(G, lam):
    s = np.linalg.svd(G, compute_uv=False) ** 2 / G.shape[0]
    low = lam + (s.min() if G.shape[0] >= G.shape[1] else 0.0)
    return (lam + s.max()) / low


# -- check_operator catches what it should ---------------------------------------------------

class _Mine(ml.Operator):
    """A user operator 2 I + u u^T on the library's protocol, with optional defects."""

    def __init__(self, u, defect=None):
        self.u = np.asarray(u, dtype=np.float64)
        self.defect = defect
        proto = ml.StaticInverseFisher(np.ones((1, 1)), 1.0)
        self._init_operator(self.u.size, np.float64, proto.backend)

    @property
    def vector(self):
        return self.u        # writable internal: a defect the readonly check finds

    def matmat(self, X):
        if self.defect == "loop":       # what SciPy's default matmat does: k matvecs
            return np.stack([self.matvec(X[:, j]) for j in range(X.shape[1])], axis=1)
        return super().matmat(X)

    def _matmat(self, X):
        if self.defect == "mutate":
            X *= 1.0 + 1e-3
        Y = 2 * X + np.outer(self.u, self.u @ X)
        if self.defect == "slightly_off":
            Y *= 1 + 1e-9
        return Y


def _dense(u):
    return 2 * np.eye(u.size) + np.outer(u, u)


def test_check_operator_passes_a_correct_user_operator():
    u = np.linspace(0, 1, 5)
    rep = mt.check_operator(_Mine(u), _dense(u), skip=("readonly",))
    assert not rep.failures and rep.worst[1] < 1
    assert "matmat.one_pass" in rep.ratios and "pickle" in rep.ratios


@pytest.mark.parametrize("defect,expected", [
    ("slightly_off", "matvec: error"),
    ("loop", "matmat.one_pass"),
])
def test_check_operator_catches_defects(defect, expected):
    u = np.linspace(0, 1, 5)
    with pytest.raises(mt.OperatorCheckError, match=expected) as info:
        mt.check_operator(_Mine(u, defect), _dense(u), skip=("readonly",))
    assert info.value.report.failures


def test_check_operator_catches_writable_internals():
    u = np.linspace(0, 1, 5)
    with pytest.raises(mt.OperatorCheckError, match="readonly.*vector"):
        mt.check_operator(_Mine(u), _dense(u))
    assert np.array_equal(u, np.linspace(0, 1, 5)), "the check ran on a copy"


def test_check_operator_refuses_a_check_that_cannot_fail():
    u = np.linspace(0, 1, 5)
    o = mt.Oracle.from_dense(_dense(u), kappa=1e16)
    with pytest.raises(ValueError, match="could not fail"):
        mt.check_operator(_Mine(u), o)
    rep = mt.check_operator(_Mine(u), o, strict=False, skip=("readonly",))
    assert rep.worst[1] < 1


def test_check_operator_finds_fisher_and_logdet_errors():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((3, 6))
    op = ml.StaticInverseFisher(G, 0.1)
    wrong = mt.inverse_fisher_oracle(G, 0.1 * (1 + 1e-9))
    with pytest.raises(mt.OperatorCheckError) as info:
        mt.check_operator(op, wrong)
    msg = str(info.value)
    assert "matvec" in msg and "fisher().matvec" in msg and "logdet" in msg


def test_check_report_and_tolerance_table():
    u = np.linspace(0, 1, 4)
    rep = mt.check_operator(_Mine(u), _dense(u), skip=("readonly",))
    assert set(mt.DEFAULT_TOLERANCES) >= {"matvec", "matmat", "logdet", "quad", "entry"}
    assert repr(rep).startswith("<CheckReport")
    with pytest.raises(ValueError, match="unknown methods"):
        mt.check_operator(_Mine(u), _dense(u), tolerances={"matvecc": 1.0})
    tight = mt.check_operator(_Mine(u), _dense(u), skip=("readonly",),
                              tolerances={"matvec": 1e3})
    assert tight.ratios["matvec"] <= rep.ratios["matvec"]


def test_oracle_copy_keeps_its_exact_products():
    o = mt.inverse_fisher_oracle(np.ones((2, 3)), 0.25)
    c = copy.copy(o)
    c.kappa = 1.0
    assert np.array_equal(c.matmat(np.ones(3)), o.matmat(np.ones(3))) and o.kappa != 1.0


def test_check_operator_catches_a_mutated_input():
    u = np.linspace(0, 1, 5)
    with pytest.raises(mt.OperatorCheckError, match="inputs_unchanged"):
        mt.check_operator(_Mine(u, "mutate"), _dense(u), skip=("readonly",), strict=False)


@settings(max_examples=15, deadline=None)
@given(mt.gradient_matrices(max_m=7, max_d=7, rank=2))
def test_gradient_matrices_rank_bound(G):
    assert np.linalg.matrix_rank(G) <= 2


def test_strategy_arguments_are_checked():
    with pytest.raises(ValueError, match="rank"):
        mt.gradient_matrices(rank=0)
    with pytest.raises(ValueError, match="kinds"):
        mt.gradient_matrices(kinds="tall")


def test_fisher_oracle_without_damping():
    G = np.array([[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]])
    o = mt.fisher_oracle(G, 0.0, N=1)
    x = np.array([0.3, -0.7])
    exact = [sum(Fraction(G[k, i]) * Fraction(G[k, j]) * Fraction(x[j])
                 for k in range(3) for j in range(2)) for i in range(2)]
    assert _ulps(o.matmat(x), exact) <= 0.5
    s = np.linalg.svd(G, compute_uv=False)
    assert o.kappa == pytest.approx((s[0] / s[-1]) ** 2, rel=1e-12)
    singular = mt.fisher_oracle(np.ones((1, 3)), 0.0)
    assert singular.kappa == math.inf and singular.logdet is None
    with pytest.raises(ValueError, match="damping"):
        mt.fisher_oracle(G, -1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit, inside curvlinops
def test_check_operator_on_a_curvlinops_operator():
    """A user's curvature operator: curvlinops' empirical Fisher of a small model (summed
    loss: EF = sum_n g_n g_n^T), checked against the exact oracle of its per-sample
    gradients, in PyTorch's parameters_to_vector order."""
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)
    loss = torch.nn.MSELoss(reduction="sum")
    params = list(model.parameters())
    ef = curvlinops.EFLinearOperator(model, loss, params, [(X, y)])
    G = []
    for n in range(20):
        model.zero_grad()
        loss(model(X[n:n + 1]), y[n:n + 1]).backward()
        G.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy())
    oracle = mt.fisher_oracle(np.array(G), 0.0, N=1)
    report = mt.check_operator(ef.to_scipy(), oracle, skip=("pickle",))
    assert "matmat" in report.ratios and "rmatvec" in report.ratios
    # and a wrong normalization (the mean instead of the sum) is caught
    with pytest.raises(mt.OperatorCheckError, match="matvec"):
        mt.check_operator(ef.to_scipy(), mt.fisher_oracle(np.array(G), 0.0), skip=("pickle",))


# -- argument checks (hostile inputs): TypeError / ValueError naming the argument -------

@pytest.mark.parametrize("call,exc,msg", [
    (lambda: mt.fisher_oracle(np.full((2, 2), np.nan), 1.0), ValueError, "grads must be finite"),
    (lambda: mt.fisher_oracle(np.ones((3, 0)), 1.0), ValueError, "grads must not be empty"),
    (lambda: mt.fisher_oracle(np.ones((2, 2)) * 1j, 1.0), TypeError, "grads must be a real"),
    (lambda: mt.fisher_oracle(np.full((2, 2), 1e300), 1.0), ValueError, "grads is too large"),
    (lambda: mt.fisher_oracle(np.ones((2, 2)), True), TypeError, "damping must be a real"),
    (lambda: mt.fisher_oracle(np.ones((2, 2)), 1.0, N="3"), TypeError, "N must be a real"),
    (lambda: mt.fisher_oracle(np.ones((2, 2)), 1.0, N=math.inf), ValueError, "N must be finite"),
    (lambda: mt.inverse_fisher_oracle(np.ones((2, 2)), None), TypeError, "damping must be"),
    (lambda: mt.Oracle.from_dense(np.full((2, 2), np.nan)), ValueError, "A must be finite"),
    (lambda: mt.Oracle.from_dense(np.zeros((2, 2))).inverse(), ValueError, "singular"),
    (lambda: mt.Oracle.from_dense(np.eye(2)).matmat(np.ones(3)), ValueError, "X must have 2"),
    (lambda: mt.Oracle(2.5, lambda X: X, kappa=1.0), TypeError, "d must be an integer"),
    (lambda: mt.Oracle(-1, lambda X: X, kappa=1.0), ValueError, "d must be >= 0"),
    (lambda: mt.Oracle(2, 3, kappa=1.0), TypeError, "apply must be a callable"),
    (lambda: mt.kronecker_oracle([(np.eye(2), np.eye(2))], shift="x"), TypeError, "shift"),
    (lambda: mt.kronecker_oracle([(np.eye(2), np.eye(2))], shift=math.nan), ValueError,
     "shift must be a number"),
    (lambda: mt.kronecker_oracle([np.eye(2)]), TypeError, r"terms\[0\] must be a pair"),
    (lambda: mt.kronecker_oracle([(np.eye(2), np.eye(2)), (np.eye(3), np.eye(2))]),
     ValueError, r"terms\[1\] must have factors"),
    (lambda: mt.kronecker_oracle([(np.zeros((2, 2)), np.eye(2))]), ValueError, "singular"),
    (lambda: mt.block_diag_oracle([np.eye(2)]), TypeError, r"oracles\[0\] must be an Oracle"),
    (lambda: mt.refined_solve(lambda Y: Y, lambda R: R, np.ones((2, 1)), maxiter=0),
     ValueError, "maxiter must be >= 1"),
    (lambda: mt.refined_solve(lambda Y: Y, lambda R: R, np.full((2, 1), np.nan)),
     ValueError, "X must be finite"),
    (lambda: mt.gradient_matrices(max_m=0), ValueError, "max_m must be >= 1"),
    (lambda: mt.gradient_matrices(max_d=2.5), TypeError, "max_d must be an integer"),
    (lambda: mt.gradient_matrices(kinds=None), TypeError, "kinds must be a sequence"),
    (lambda: mt.gradient_matrices(dtype=np.float16), ValueError, "dtype must be float64"),
    (lambda: mt.gradient_matrices(rank=2.0), TypeError, "rank must be an integer"),
    (lambda: mt.fisher_problems(ratio=(2.0, 1.0)), ValueError, r"ratio\[1\] must be >= 2"),
    (lambda: mt.fisher_problems(ratio=(1e-8, math.inf)), ValueError, r"ratio\[1\] must be fin"),
    (lambda: mt.fisher_problems(ratio=(1.0,)), TypeError, "ratio must be a pair"),
    (lambda: mt.fisher_problems(max_m=0), ValueError, "max_m must be >= 1"),   # at the call
])
def test_hostile_arguments_raise_named_errors(call, exc, msg):
    pytest.importorskip("hypothesis")
    with pytest.raises(exc, match=msg):
        call()


def test_gradient_matrices_accepts_a_numpy_integer_rank():
    from hypothesis import given, settings
    @settings(max_examples=3, deadline=None, database=None)
    @given(mt.gradient_matrices(max_m=4, max_d=4, rank=np.int64(1)))
    def t(G):
        assert np.linalg.matrix_rank(G) <= 1
    t()


class _Twice:
    shape, dtype = (3, 3), np.dtype(np.float64)

    def matvec(self, x):
        return 2 * x


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 2.5}, TypeError, "k must be an integer"),
    ({"rng": 3}, TypeError, "rng must be a numpy.random.Generator"),
    ({"eps": -1.0}, ValueError, "eps must be > 0"),
    ({"eps": math.nan}, ValueError, "eps must be a number"),
    ({"tolerances": [1]}, TypeError, "tolerances must be a dict"),
    ({"tolerances": {"matvec": -1.0}}, ValueError, r"tolerances\['matvec'\] must be > 0"),
    ({"tolerances": {"matvec": math.nan}}, ValueError, r"tolerances\['matvec'\] must be a num"),
    # a string was taken as a set of letters / substrings, and unknown names checked nothing
    ({"methods": "matvec"}, TypeError, "methods must be a collection"),
    ({"methods": ["bogus"]}, ValueError, "methods has unknown check names"),
    ({"skip": "pickle"}, TypeError, "skip must be a collection"),
    ({"skip": ["bogus"]}, ValueError, "skip has unknown check names"),
    ({"strict": "no"}, TypeError, "strict must be True or False"),
])
def test_check_operator_arguments_are_checked(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mt.check_operator(_Twice(), 2 * np.eye(3), **kwargs)


def test_check_operator_refuses_a_non_operator_instead_of_passing_it():
    # check_operator(None, A) used to pass with every check "skipped"
    with pytest.raises(TypeError, match="op must be an operator with shape and matvec"):
        mt.check_operator(None, np.eye(3))
    with pytest.raises(TypeError, match="op must be an operator"):
        mt.check_operator(np.eye(3), np.eye(3))


def test_check_operator_flags_a_wrong_operator_with_a_good_tolerance_override():
    with pytest.raises(mt.OperatorCheckError, match="matvec: error 0.5"):
        mt.check_operator(_Twice(), 4 * np.eye(3), skip=("pickle",),
                          tolerances={"matvec": 4.0}, methods=("matvec",))


# -- a crash is a failure, not a missing method (skipped only what the operator lacks) ------

_DIAG = np.diag([1.0, 2.0, 3.0])


class _Plain:
    """A user operator with shape, dtype, matvec and matmat (nothing else)."""
    __array_ufunc__ = None          # x @ op defers to op.__rmatmul__

    def __init__(self, A):
        self.A, self.shape, self.dtype = A, A.shape, A.dtype

    def matvec(self, x):
        return self.A @ x

    def matmat(self, X):
        return self.A @ X


class _Crashing(_Plain):
    """matvec and matmat read an attribute never set (a bug inside the operator)."""

    def matvec(self, x):
        return self.A @ x + self._offset

    def matmat(self, X):
        return self.A @ X + self._offset


class _OneColumnOnly(_Plain):
    def matmat(self, X):
        if X.shape[1] > 1:
            raise NotImplementedError("only one column at a time")
        return self.A @ X


class _MatvecRefuses(_Plain):
    def matvec(self, x):
        raise NotImplementedError("matvec is not ready")


class _BadTranspose(_Plain):
    @property
    def T(self):                    # a bug inside an existing property
        return self._transposed


def test_check_operator_fails_an_operator_whose_matvec_crashes():
    # the AttributeError from inside matvec was taken for "matvec not implemented": 14
    # checks skipped and a passing report
    with pytest.raises(mt.OperatorCheckError, match="matvec: raised AttributeError") as info:
        mt.check_operator(_Crashing(_DIAG), _DIAG, skip=("pickle",))
    rep = info.value.report
    assert "matvec" not in rep.skipped and "matmat" not in rep.skipped
    assert any(f.startswith("matmat: raised AttributeError") and "_offset" in f
               for f in rep.failures), rep.failures


@pytest.mark.parametrize("cls,expected", [
    (_OneColumnOnly, "matmat: raised NotImplementedError: only one column"),
    (_MatvecRefuses, "matvec: raised NotImplementedError: matvec is not ready"),
    (_BadTranspose, "adjoint: raised AttributeError"),
])
def test_check_operator_fails_an_implemented_method_that_raises(cls, expected):
    with pytest.raises(mt.OperatorCheckError, match=expected) as info:
        mt.check_operator(cls(_DIAG), _DIAG, skip=("pickle",))
    name = expected.split(":")[0]
    assert name not in info.value.report.skipped


class _MineCrashing(_Mine):
    def _matmat(self, X):
        return super()._matmat(X) * self._scale          # never set


def test_check_operator_fails_a_library_operator_whose_hook_crashes():
    u = np.linspace(0, 1, 4)
    with pytest.raises(mt.OperatorCheckError, match="matvec: raised AttributeError") as info:
        mt.check_operator(_MineCrashing(u), _dense(u), skip=("readonly",))
    rep = info.value.report
    for name in ("matmat", "diagonal", "entry", "todense", "quad", "algebra"):
        assert any(f.startswith(f"{name}: raised AttributeError") for f in rep.failures), name
        assert name not in rep.skipped


class _MinePartial(_Mine):
    def _matmat(self, X):
        if X.shape[1] > 1:                      # "not yet": the base class's default refuses
            return ml.Operator._matmat(self, X)
        return super()._matmat(X)


def test_check_operator_fails_an_override_that_falls_back_on_the_base_default():
    # the NotImplementedError comes from Operator._matmat, but the class overrides
    # _matmat: it implements the method, for some inputs only
    u = np.linspace(0, 1, 4)
    with pytest.raises(mt.OperatorCheckError,
                       match="matmat: raised NotImplementedError") as info:
        mt.check_operator(_MinePartial(u), _dense(u), skip=("readonly",))
    assert "matmat" not in info.value.report.skipped
    assert "matvec" in info.value.report.ratios         # one column: fine


class _NonSymmetric(ml.Operator):
    """A library operator that is not symmetric and implements only _matmat: the base
    class's defaults raise NotImplementedError for the transpose products."""

    def __init__(self, M):
        self.M = M
        self._init_operator(M.shape[0], np.float64,
                            ml.StaticInverseFisher(np.ones((1, 1)), 1.0).backend)

    @property
    def symmetric(self):
        return False

    def _matmat(self, X):
        return self.M @ X


def test_check_operator_still_skips_what_an_operator_does_not_implement():
    import scipy.sparse.linalg as spla
    rep = mt.check_operator(_Plain(_DIAG), _DIAG, skip=("pickle",))
    assert not rep.failures and "matmat" in rep.ratios
    assert {"rmatvec", "rmatmat", "adjoint", "diagonal", "entry", "logdet"} <= set(rep.skipped)
    # a SciPy LinearOperator without rmatvec: its transpose products are skipped (its
    # adjoint used to fail with "'NoneType' object is not callable")
    lo = spla.LinearOperator((3, 3), matvec=lambda x: _DIAG @ x, dtype=np.float64)
    rep = mt.check_operator(lo, _DIAG, skip=("pickle",))
    assert {"rmatvec", "rmatmat", "adjoint"} <= set(rep.skipped) and "matmat" in rep.ratios
    # the library's base class defaults (NotImplementedError) for a non-symmetric operator
    M = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.0, 4.0]])
    rep = mt.check_operator(_NonSymmetric(M), mt.Oracle.from_dense(M), skip=("pickle",))
    assert {"rmatvec", "rmatmat", "adjoint"} <= set(rep.skipped)
    assert "matvec" not in rep.skipped and "entry" in rep.ratios


# -- arrays handed out and exact result shapes --------------------------------------------------

class _CachedDiag(_Plain):
    """diagonal() hands out its own writable cache (the products never read it)."""

    def diagonal(self):
        if not hasattr(self, "_d"):
            self._d = np.diag(self.A).copy()
        return self._d


class _CachedDiagReadOnly(_Plain):
    def diagonal(self):
        if not hasattr(self, "_d"):
            self._d = np.diag(self.A).copy()
        view = self._d.view()           # a read-only view on each call: a flag set on the
        view.flags.writeable = False    # cache itself would not survive copy.deepcopy
        return view


class _CachedScale(_Plain):
    """An array-valued property that hands out a writable cache."""

    @property
    def scales(self):
        if not hasattr(self, "_s"):
            self._s = np.diag(self.A).copy()
        return self._s


@pytest.mark.parametrize("cls,label", [(_CachedDiag, "diagonal()"),
                                       (_CachedScale, "scales[0][0]")])
def test_check_operator_catches_a_writable_cache_handed_out(cls, label):
    op = cls(_DIAG)
    with pytest.raises(mt.OperatorCheckError, match=r"readonly\.handed_out") as info:
        mt.check_operator(op, _DIAG, skip=("pickle",))
    assert any(f.startswith("readonly.handed_out") and label in f
               for f in info.value.report.failures), info.value.report.failures
    assert "readonly" in info.value.report.ratios      # the products were not changed


def test_check_operator_accepts_read_only_arrays_handed_out():
    rep = mt.check_operator(_CachedDiagReadOnly(_DIAG), _DIAG, skip=("pickle",))
    assert "readonly.handed_out" in rep.ratios and "diagonal" in rep.ratios


class _Column(_Plain):
    """Products of a (d,) x as a (d, 1) column, where ``defect`` says."""

    def __init__(self, A, defect):
        super().__init__(A)
        self.defect = defect

    def _out(self, y, where):
        return y.reshape(-1, 1) if where == self.defect and y.ndim == 1 else y

    def rmatvec(self, x):
        return self._out(self.A.T @ x, "rmatvec")

    def rmatmat(self, X):
        return self.A.T @ X

    def __matmul__(self, x):
        return self._out(self.A @ x, "matmul")

    def __rmatmul__(self, x):
        return self._out(x @ self.A, "rmatmul")


@pytest.mark.parametrize("defect,expected", [
    ("rmatvec", r"rmatvec\.shape: .*gave shape \(3, 1\), expected \(3,\)"),
    ("matmul", r"matmul\.op@x\.shape: .*gave shape \(3, 1\)"),
    ("rmatmul", r"matmul\.x@op\.shape: .*gave shape \(3, 1\)"),
])
def test_check_operator_checks_exact_result_shapes(defect, expected):
    with pytest.raises(mt.OperatorCheckError, match=expected):
        mt.check_operator(_Column(_DIAG, defect), _DIAG, skip=("pickle",))
    rep = mt.check_operator(_Column(_DIAG, None), _DIAG, skip=("pickle",))
    assert {"rmatvec.shape", "matmul.op@x.shape", "matmul.x@op.shape"} <= set(rep.ratios)


def _library_cases():
    from registry import CASES
    by_name = {c.name: c for c in CASES}
    return [by_name[n] for n in ("static-wide-f64", "static-tall-f64",
                                 "sliding-float64-window-cholesky", "kfac-pi")]


@pytest.mark.parametrize("case", _library_cases(), ids=lambda c: c.name)
def test_library_operators_pass_the_stricter_checks(case):
    op = case.build("cpu")
    rep = mt.check_operator(op, case.oracle_for(op), rng=np.random.default_rng(7))
    for name in ("readonly", "readonly.handed_out", "rmatvec.shape", "rmatmat.shape",
                 "matmul.op@x.shape", "matmul.x@op.shape", "adjoint.T.shape",
                 "algebra.op*x.shape", "fisher().readonly.handed_out"):
        assert name in rep.ratios, (name, rep.skipped)
    assert rep.skipped == ["fisher().fisher"], rep.skipped


def test_an_operator_sum_passes_the_stricter_checks():
    rng = np.random.default_rng(5)
    G1, G2 = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    F = ml.StaticInverseFisher(G1, 0.1).fisher() + ml.StaticInverseFisher(G2, 0.2).fisher()
    # F1 + F2 = 0.3 I + [G1; G2]^T [G1; G2] / 4, exactly
    rep = mt.check_operator(F, mt.fisher_oracle(np.vstack([G1, G2]), 0.3, N=4))
    assert {"readonly.handed_out", "matmul.op@x.shape", "rmatvec.shape"} <= set(rep.ratios)
    assert set(rep.skipped) <= {"logdet", "fisher"}, rep.skipped


def test_check_operator_accepts_a_property_that_counts_products():
    """A NumPy scalar property that changes with every product (a call counter) is not a
    writable cache: what is handed out is read again before any product runs."""
    A = np.diag([1.0, 2.0, 3.0])

    class Counting:
        __array_ufunc__ = None

        def __init__(self):
            self.shape, self.dtype, self._n = (3, 3), np.dtype(np.float64), np.int64(0)

        @property
        def calls(self):
            return self._n

        def matvec(self, x):
            self._n += 1
            return A @ x

        def matmat(self, X):
            self._n += 1
            return A @ X

    mt.check_operator(Counting(), A, skip=("pickle",))


@pytest.mark.parametrize("lam", [1e-100, 1e-140])
def test_oracles_take_tiny_dampings(lam):
    """mpmath's Cholesky judged pivots against an absolute 2^-320: lambda I with lambda
    below ~5e-97 was 'not positive-definite'."""
    from mfac_linalg.testing import fisher_oracle, inverse_fisher_oracle
    G = np.zeros((2, 1))
    assert fisher_oracle(G, lam).logdet == pytest.approx(np.log(lam), rel=1e-15)
    assert inverse_fisher_oracle(G, lam).logdet == pytest.approx(np.log(lam), rel=1e-15)
    G2 = np.random.default_rng(1).standard_normal((3, 4)) * 1e-50
    o = inverse_fisher_oracle(G2, 1e-99)
    op = ml.StaticInverseFisher(G2, 1e-99)
    assert o.logdet == pytest.approx(op.logdet(), rel=1e-12)
