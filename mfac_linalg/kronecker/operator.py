r"""The inverse and forward operators shared by every Kronecker builder (docs/math.md §4, §8).

Every damped approximation M of the builders is held in one form,

    M      = (K_B^{-T} kron K_C^{-T}) diag(vec S) (K_B^{-1} kron K_C^{-1}),
    M^{-1} vec(V) = vec( K_B [ (K_B^T V K_C) ./ S ] K_C^T ),

with K_B, K_C eigenbases (K-FAC, EKFAC, KPSVD; then K^{-T} = K) or generalised eigenbases
(the two-term sums).  Vectors are vec(V) of V (d_out x d_in) in row-major order,
``[W | b]`` when the layer has a bias (the bias is the last column of V).
"""
from __future__ import annotations

import numpy as np

from .. import _backend as B
from .._operator import Operator

__all__ = ["KroneckerInverse", "KroneckerFisher", "BlockDiagonal", "block_diag"]


def _readonly(X):
    """A read-only view (NumPy) or a copy (CuPy, which has no read-only flag)."""
    if isinstance(X, np.ndarray):
        v = X.view()
        v.flags.writeable = False
        return v
    return X.copy()


class _Picklable:
    """Pickle/deepcopy support: the backend (which holds a module) travels as its device name."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_backend"] = repr(self._backend)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["_backend"] = B.backend_for_device(state["_backend"])
        self.__dict__.update(state)


class _KronProducts(_Picklable, Operator):
    """``matvec`` also takes a (d_out, d_in) matrix V and returns one; ``matmat`` on (d, 0)."""

    def matvec(self, x):
        """``A @ x`` for x of shape (d,), (d, 1) or (d_out, d_in) (vec(V) row-major; V back)."""
        arr, _ = B.asarray(x, "x", backend=self._backend)
        if arr.ndim == 2 and arr.shape == (self.d_out, self.d_in) and self.d_in != 1:
            return Operator.matvec(self, arr.reshape(-1)).reshape(self.d_out, self.d_in)
        return Operator.matvec(self, x)

    def _apply_direct(self, X, Bm, Cm):
        """vec(B V C) for symmetric B, C and the k columns of X at once: two GEMMs."""
        k = X.shape[1]
        if k == 0:
            return self._backend.xp.zeros((self._d, 0), dtype=X.dtype)
        V = X.T.reshape(k, self.d_out, self.d_in)
        return (Bm @ V @ Cm).reshape(k, -1).T

    def _apply(self, X, KL, KR, S, divide):
        """vec(KL [(KL_t V KR) ./ S or .* S] KR^T) for the k columns of X at once."""
        k = X.shape[1]
        if k == 0:
            return self._backend.xp.zeros((self._d, 0), dtype=X.dtype)
        V = X.T.reshape(k, self.d_out, self.d_in)
        T = KL.T @ V @ KR
        T = T / S if divide else T * S
        return (KL @ T @ KR.T).reshape(k, -1).T


class KroneckerInverse(_KronProducts):
    r"""M^{-1} for a damped Kronecker approximation M (module docstring), d = d_out d_in.

    ``M^{-1} vec(V) = vec(K_B [(K_B^T V K_C) ./ S] K_C^T)``.  Costs: ``matvec`` and ``matmat``
    O(k d_out d_in (d_out + d_in)) for k vectors, ``diagonal`` O(d_out d_in (d_out + d_in)),
    ``entry`` O(d_out d_in), ``logdet`` O(d_out d_in).

    Attributes
    ----------
    factors : list of (B_i, C_i), or (U_Gamma, U_A, S*) for EKFAC
        The *undamped* approximation F~ = sum_i B_i kron C_i (read-only views).
    method, damping, info : str, float, dict
        ``info`` holds the build time and, for iterative builders, the convergence report.
    clipped : int
        How many entries of S were at or below 1e-10 max S before the ``indefinite`` rule.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((60, 3)), rng.standard_normal((60, 2))
    >>> op = ml.kfac(a, g, 0.1, bias=True)        # over vec([W | b]): 2 x 4
    >>> op.shape, op.method
    ((8, 8), 'kfac')
    >>> V = rng.standard_normal((2, 4))
    >>> bool(np.allclose(op.fisher().matvec(op.matvec(V)), V))
    True
    """

    def __init__(self, method, KB, KC, S, *, KBinvT, KCinvT, logdet_offset, terms=None,
                 ekfac=None, damping, backend, info=None, clipped=0, direct=None):
        # direct: (B^-1, C^-1, B, C) of a product form M = B kron C (S = 1): products as
        # two GEMMs, B^-1 V C^-1 and B V C, instead of four through K_B, K_C
        self._direct = direct
        self._method = method
        self._KB, self._KC, self._S = KB, KC, S
        self._KBinvT, self._KCinvT = KBinvT, KCinvT
        self._logdet_offset = logdet_offset
        self._terms = terms
        self._ekfac = ekfac
        self._damping = damping
        self.d_out, self.d_in = KB.shape[0], KC.shape[0]
        self.info = info if info is not None else {}
        self.clipped = clipped
        self._init_operator(self.d_out * self.d_in, np.float64, backend)

    @property
    def method(self):
        """The builder: ``"kfac"``, ``"ekfac"``, ``"kpsvd"``, ``"deflation"``, ``"lanczos"``,
        ``"kfac_corrected"``."""
        return self._method

    @property
    def damping(self):
        return self._damping

    @property
    def factors(self):
        """The undamped approximation (read-only): ``[(B_i, C_i)]`` with F~ = sum B_i kron C_i,
        or for EKFAC ``(U_Gamma, U_A, S*)`` with F~ = (U_G kron U_A) diag(vec S*) (...)^T."""
        if self._ekfac is not None:
            return tuple(_readonly(X) for X in self._ekfac)
        return [(_readonly(b), _readonly(c)) for b, c in self._terms]

    def _repr_fields(self):
        return [f"method={self._method}", f"d_out={self.d_out}", f"d_in={self.d_in}",
                f"damping={self._damping:.0e}"]

    def _matmat(self, X):
        if self._direct is not None:
            return self._apply_direct(X, self._direct[0], self._direct[1])
        return self._apply(X, self._KB, self._KC, self._S, True)

    def _diagonal(self):
        if self._direct is not None:
            xp = self._backend.xp
            return xp.outer(xp.diagonal(self._direct[0]), xp.diagonal(self._direct[1])).reshape(-1)
        return ((self._KB ** 2) @ (1.0 / self._S) @ (self._KC ** 2).T).reshape(-1)

    def _entry(self, i, j):
        (a, b), (c, d) = divmod(i, self.d_in), divmod(j, self.d_in)
        return B.scalar(((self._KB[a] * self._KB[c]) @ (1.0 / self._S))
                        @ (self._KC[b] * self._KC[d]))

    def logdet(self):
        """log det M (of the damped approximation): sum log S + the bases' log-determinant."""
        return B.scalar(self._backend.xp.log(self._S).sum()) + self._logdet_offset

    def fisher(self):
        """The damped approximation M itself (same protocol); ``inverse()`` is this one's
        ``fisher()`` and ``fisher().inverse()`` is this operator."""
        return KroneckerFisher(self)


class KroneckerFisher(_KronProducts):
    """The damped approximation M: vec(V) -> vec(K_B^{-T} [(K_B^{-1} V K_C^{-T}) .* S] K_C^{-1}).

    Same costs as :class:`KroneckerInverse`; ``inverse()`` gives it back.
    """

    def __init__(self, inv):
        self._inv = inv
        self.d_out, self.d_in = inv.d_out, inv.d_in
        self._init_operator(inv.shape[0], np.float64, inv.backend)

    def _repr_fields(self):
        return self._inv._repr_fields()

    def inverse(self):
        """M^{-1}: the :class:`KroneckerInverse` this operator came from."""
        return self._inv

    def _matmat(self, X):
        i = self._inv
        if i._direct is not None:
            return self._apply_direct(X, i._direct[2], i._direct[3])
        return self._apply(X, i._KBinvT, i._KCinvT, i._S, False)

    def _diagonal(self):
        i = self._inv
        return ((i._KBinvT ** 2) @ i._S @ (i._KCinvT ** 2).T).reshape(-1)

    def _entry(self, r, c):
        i = self._inv
        (a, b), (p, q) = divmod(r, self.d_in), divmod(c, self.d_in)
        return B.scalar(((i._KBinvT[a] * i._KBinvT[p]) @ i._S) @ (i._KCinvT[b] * i._KCinvT[q]))

    def logdet(self):
        """log det M."""
        return self._inv.logdet()


def _each(ops, method):
    """[op.method() for op in ops], a failure naming the block."""
    out = []
    for k, op in enumerate(ops):
        fn = getattr(op, method, None)
        if not callable(fn):
            raise TypeError(f"ops[{k}] ({type(op).__name__}) has no {method}()")
        try:
            out.append(fn())
        except TypeError as exc:
            raise TypeError(f"ops[{k}] ({type(op).__name__}): {exc}") from None
    return out


class BlockDiagonal(_Picklable, Operator):
    """blockdiag(op_1, op_2, ...): one operator over the concatenated parameters.

    ``matmat`` splits X by the blocks' sizes (one product per block, the k columns together);
    ``diagonal`` concatenates; ``entry`` is the block's entry or 0; ``logdet``, ``fisher()`` and
    ``inverse()`` combine the blocks' own.  Costs: the sum of the blocks'.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((50, 3)), rng.standard_normal((50, 2))
    >>> net = ml.block_diag([ml.kfac(a, g, 0.1), ml.ekfac(a[:, :2], g, 0.1)])
    >>> net.shape
    (10, 10)
    >>> x = rng.standard_normal(10)
    >>> bool(np.allclose(net.fisher() @ (net @ x), x))
    True
    """

    def __init__(self, ops):
        if isinstance(ops, (Operator, str, bytes, dict)) or not hasattr(ops, "__iter__"):
            raise TypeError(f"ops must be a sequence of operators (one per block); got "
                            f"{type(ops).__name__}")
        ops = list(ops)
        if not ops:
            raise ValueError("ops must hold at least one operator; got an empty sequence")
        for k, op in enumerate(ops):
            if not isinstance(op, Operator):
                raise TypeError(f"ops[{k}] must be an operator; got {type(op).__name__}")
            if op.backend != ops[0].backend:
                raise TypeError(f"ops[{k}] lives on {op.device}, ops[0] on {ops[0].device}")
        self._ops = ops
        self._tensors_out = any(op._tensors_out for op in ops)
        sizes = [op.shape[0] for op in ops]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        dtype = np.result_type(*[op.dtype for op in ops])
        self._init_operator(int(self._offsets[-1]), dtype, ops[0].backend)

    @property
    def blocks(self):
        return list(self._ops)

    def _repr_fields(self):
        return [f"blocks={len(self._ops)}"]

    def _matmat(self, X):
        xp = self._backend.xp
        if X.shape[1] == 0:
            return xp.zeros((self._d, 0), dtype=X.dtype)
        return xp.concatenate([op.matmat(X[a:b]) for op, a, b in
                               zip(self._ops, self._offsets[:-1], self._offsets[1:])], axis=0)

    def _diagonal(self):
        xp = self._backend.xp
        return xp.concatenate([op.diagonal().astype(self._dtype) for op in self._ops])

    def _entry(self, i, j):
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        a, b = self._offsets[k], self._offsets[k + 1]
        if not a <= j < b:
            return 0.0
        return self._ops[k].entry(int(i - a), int(j - a))

    def logdet(self):
        """log det F of the block-diagonal F: the sum of the blocks' ``logdet()``.

        Every block's ``logdet()`` is log det of its Fisher F_k, whether the block applies
        F_k^{-1} (an inverse-Fisher operator, with ``fisher()``) or F_k (a forward
        operator), so the sum has one meaning only when the blocks are of one kind:
        blockdiag(F_1^{-1}, F_2) is the inverse of blockdiag(F_1, F_2^{-1}), whose log det
        is log det F_1 - log det F_2, not the sum.  A mix is refused."""
        for k, op in enumerate(self._ops):
            if not hasattr(op, "logdet"):
                raise TypeError(f"ops[{k}] ({type(op).__name__}) has no logdet()")
        kinds = [_kind(op) for op in self._ops]
        if "mixed" in kinds:
            k = kinds.index("mixed")
            raise TypeError(f"logdet() needs blocks of one kind: ops[{k}] is "
                            f"{_KIND_NAME['mixed']} (take logdet() of each block)")
        if len(set(kinds)) > 1:
            k = next(i for i, kd in enumerate(kinds) if kd != kinds[0])
            raise TypeError(
                f"logdet() needs blocks of one kind: ops[0] is {_KIND_NAME[kinds[0]]} and "
                f"ops[{k}] is {_KIND_NAME[kinds[k]]}; their log det F add different "
                "meanings (take logdet() of each block)")
        return sum(op.logdet() for op in self._ops)

    def fisher(self):
        """blockdiag of the blocks' ``fisher()`` (every block an inverse-Fisher operator)."""
        return BlockDiagonal(_each(self._ops, "fisher"))

    def inverse(self):
        """blockdiag of the blocks' ``inverse()``: works for any mix of inverse-Fisher
        operators, their forward operators and anything else with an ``inverse()``."""
        return BlockDiagonal(_each(self._ops, "inverse"))


_KIND_NAME = {"inverse": "an inverse-Fisher operator (it has fisher())",
              "forward": "a forward operator (no fisher())",
              "mixed": "a block_diag of both kinds"}


def _kind(op):
    """"inverse" (applies F^{-1}: has ``fisher()``), "forward", or for a BlockDiagonal the
    kind of its blocks ("mixed" where they differ)."""
    if isinstance(op, BlockDiagonal):
        kinds = {_kind(b) for b in op._ops}
        return kinds.pop() if len(kinds) == 1 else "mixed"
    inner = getattr(op, "_kind_of", None)     # an adapter (torch order): the wrapped one's
    if inner is not None:
        return _kind(inner)
    return "inverse" if hasattr(op, "fisher") else "forward"


def block_diag(ops):
    """A block-diagonal operator over layers: ``block_diag([op_layer1, op_layer2, ...])``.

    Parameters
    ----------
    ops : sequence of Operator
        The blocks, in the order of the parameter vector; all on one backend.

    Returns
    -------
    BlockDiagonal

    Raises
    ------
    ValueError
        ``ops`` is empty.
    TypeError
        ``ops`` is not a sequence, an element is not an operator, or the blocks live on
        different devices.

    Examples
    --------
    >>> import numpy as np, mfac_linalg as ml
    >>> rng = np.random.default_rng(1)
    >>> a, g = rng.standard_normal((40, 4)), rng.standard_normal((40, 3))
    >>> ml.block_diag([ml.kfac(a, g, 0.1), ml.kfac(a, g, 0.1, bias=True)]).shape
    (27, 27)
    """
    return BlockDiagonal(ops)
