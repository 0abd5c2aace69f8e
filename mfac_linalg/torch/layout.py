r"""Vector layouts: PyTorch's ``parameters_to_vector`` order and the Kronecker order.

PyTorch (and curvlinops) flatten a model's parameters layer by layer, each layer as
its weight flattened row-major, then its bias::

    torch order, one layer:   [W[0, 0], ..., W[0, d_in-1], W[1, 0], ..., W[d_out-1, d_in-1], b[0], ..., b[d_out-1]]

The Kronecker operators of :mod:`mfac_linalg.kronecker` act on the augmented matrix
[W | b] (d_out x (d_in + 1)) flattened row-major (docs/math.md §4: vec(DW) = kron(g, a)
with a 1 appended to a), so each row of W is followed by its bias entry::

    Kronecker order, one layer: [W[0, 0], ..., W[0, d_in-1], b[0], W[1, 0], ..., b[d_out-1]]

The two differ for every layer with a bias (and agree without one).  A ``Conv2d``
weight (C_out, C_in, kh, kw) is the matrix (C_out, C_in kh kw), the order of
``torch.nn.functional.unfold``'s patches, so the same rule holds with
d_in = C_in kh kw.  Position k of the Kronecker vector holds entry ``perm[k]`` of the
torch vector: ``x_kron = x_torch[perm]`` and ``x_torch = x_kron[inverse]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import _validate as V
from .._operator import Operator
from ._convert import is_tensor, to_torch

__all__ = ["kronecker_index", "LayerSpec", "ParameterLayout", "PermutedOperator"]


def kronecker_index(d_out, d_in, bias):
    r"""The torch-order index of every Kronecker-order position of one layer.

    For position k = i (d_in + 1) + j of [W | b] flattened row-major (j = d_in is the
    bias), the index in [vec(W), b] is i d_in + j (j < d_in) or d_out d_in + i (j = d_in).
    Without a bias the two orders agree and the index is ``arange(d_out * d_in)``.

    Parameters
    ----------
    d_out, d_in : int
        The weight matrix's shape (a ``Conv2d``: C_out and C_in kh kw).
    bias : bool
        Whether the layer has a bias.

    Returns
    -------
    numpy.ndarray of int64, shape (d_out (d_in + bias),).  O(d_out d_in).

    Examples
    --------
    >>> from mfac_linalg.torch import kronecker_index
    >>> kronecker_index(2, 3, True).tolist()
    [0, 1, 2, 6, 3, 4, 5, 7]
    """
    d_out = V.positive_int(d_out, "d_out")
    d_in = V.positive_int(d_in, "d_in")
    bias = V.boolean(bias, "bias")
    w = np.arange(d_out * d_in, dtype=np.int64).reshape(d_out, d_in)
    if not bias:
        return w.reshape(-1)
    b = d_out * d_in + np.arange(d_out, dtype=np.int64)[:, None]
    return np.concatenate([w, b], axis=1).reshape(-1)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a :class:`ParameterLayout` (frozen).

    The layer's weight as a d_out x d_in matrix W, and its bias b, are the
    d_out (d_in + bias) parameters [W | b] (row-major) of the Kronecker order
    (docs/math.md §4).

    Attributes
    ----------
    name : str
        The module's name in the model (``""`` for a bare layer).
    kind : str
        ``"linear"`` or ``"conv2d"``.
    d_out, d_in : int
        The weight as a matrix (a Conv2d: C_out x C_in kh kw).
    bias : bool
        Whether the layer has a bias.
    size : int
        The number of parameters, d_out (d_in + bias) (a property).

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import ParameterLayout
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
    ...                             torch.nn.Linear(4, 1, bias=False))
    >>> [(l.name, l.kind, l.d_out, l.d_in, l.bias, l.size)
    ...  for l in ParameterLayout.from_model(model).layers]
    [('0', 'conv2d', 4, 18, True, 76), ('2', 'linear', 1, 4, False, 4)]
    """
    name: str
    kind: str
    d_out: int
    d_in: int
    bias: bool

    @property
    def size(self):
        """Number of parameters, d_out (d_in + bias)."""
        return self.d_out * (self.d_in + int(self.bias))


def _spec_of(name, module):
    nn = torch.nn
    uninit = getattr(nn.parameter, "UninitializedParameter", ())
    if uninit and any(isinstance(p, uninit) for p in module.parameters(recurse=False)):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has not been initialised: "
                         "run one forward pass of the model first (a lazy module's shapes are "
                         "set by its first input)")
    if type(module) is nn.Linear or isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        kind = "linear"
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"layer {name!r}: Conv2d with groups={module.groups} is not "
                             "supported (groups=1 only)")
        d_out = module.weight.shape[0]
        d_in = int(np.prod(module.weight.shape[1:]))
        kind = "conv2d"
    else:
        raise TypeError(f"layer {name!r} must be nn.Linear or nn.Conv2d; got "
                        f"{type(module).__name__}")
    return LayerSpec(name, kind, int(d_out), int(d_in), module.bias is not None)


class ParameterLayout:
    r"""The parameters of a sequence of layers in torch order and in Kronecker order.

    The torch-order vector is ``parameters_to_vector`` of the layers' parameters
    (per layer: weight, then bias); the Kronecker-order vector concatenates the
    layers' [W | b] flattened row-major.  ``perm`` maps one to the other
    (``x_kron = x_torch[perm]``, ``x_torch = x_kron[inverse]``); converting costs
    one gather, O(d) per vector.

    Parameters
    ----------
    layers : sequence of LayerSpec, or of (d_out, d_in, bias) triples

    Attributes
    ----------
    layers : tuple of LayerSpec
    dim : int, the number of parameters d
    offsets : numpy int64 (len(layers) + 1,), each layer's start in either order
    perm, inverse : numpy int64 (d,) index arrays

    Examples
    --------
    >>> import torch
    >>> from mfac_linalg.torch import ParameterLayout
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> lay = ParameterLayout.from_model(model)
    >>> lay.dim, [l.name for l in lay.layers]
    (11, ['0', '2'])
    >>> x = torch.nn.utils.parameters_to_vector(model.parameters())
    >>> torch.equal(lay.to_torch(lay.to_kronecker(x)), x)
    True
    >>> W, b = model[0].weight, model[0].bias          # layer 0 as [W | b], row-major
    >>> torch.equal(lay.to_kronecker(x)[:8], torch.cat([W, b[:, None]], 1).reshape(-1))
    True
    """

    def __init__(self, layers):
        if isinstance(layers, (str, bytes, dict)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of LayerSpec or (d_out, d_in, bias) "
                            f"triples; got {type(layers).__name__}")
        specs = []
        for k, l in enumerate(layers):
            if isinstance(l, LayerSpec):
                specs.append(l)
                continue
            if not isinstance(l, (tuple, list)) or len(l) != 3:
                raise TypeError(f"layers[{k}] must be a LayerSpec or a (d_out, d_in, bias) "
                                f"triple; got {type(l).__name__} {l!r}")
            d_out = V.positive_int(l[0], f"layers[{k}][0] (d_out)")
            d_in = V.positive_int(l[1], f"layers[{k}][1] (d_in)")
            bias = V.boolean(l[2], f"layers[{k}][2] (bias)")
            specs.append(LayerSpec(str(k), "linear", d_out, d_in, bias))
        if not specs:
            raise ValueError("layers must hold at least one layer; got none")
        self.layers = tuple(specs)
        sizes = [s.size for s in specs]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = int(self.offsets[-1])
        self.perm = np.concatenate([kronecker_index(s.d_out, s.d_in, s.bias) + off
                                    for s, off in zip(specs, self.offsets[:-1])])
        self.inverse = np.empty_like(self.perm)
        self.inverse[self.perm] = np.arange(self.dim, dtype=np.int64)
        for a in (self.offsets, self.perm, self.inverse):
            a.setflags(write=False)           # handed out: read-only
        self._torch_idx = {}

    # -- construction from a model --------------------------------------------------
    @classmethod
    def from_model(cls, model, layers=None):
        """The layout of a model's ``nn.Linear`` / ``nn.Conv2d`` layers.

        Parameters
        ----------
        model : torch.nn.Module
        layers : optional sequence of module names or modules: only these layers (in
            the model's parameter order).  Without it, every Linear / Conv2d layer with
            trainable parameters, and the model must have no other trainable
            parameters (else ``ValueError`` naming them): the layout then covers
            exactly ``parameters_to_vector(p for p in model.parameters() if p.requires_grad)``.

        Returns
        -------
        ParameterLayout, with ``modules`` (the layers' modules, in order) set.
        """
        modules = select_layers(model, layers)
        lay = cls([_spec_of(n, m) for n, m in modules])
        lay.modules = tuple(m for _, m in modules)
        return lay

    def parameters(self):
        """The layers' parameters in torch order (needs a layout from :meth:`from_model`)."""
        mods = getattr(self, "modules", None)
        if mods is None:
            raise ValueError("this layout was not built from a model (use from_model)")
        out = []
        for m in mods:
            out.append(m.weight)
            if m.bias is not None:
                out.append(m.bias)
        return out

    # -- conversions ---------------------------------------------------------------
    def _index(self, which, x):
        arr = self.perm if which == "perm" else self.inverse
        if is_tensor(x):
            key = (which, x.device)
            if key not in self._torch_idx:
                self._torch_idx[key] = torch.tensor(arr, device=x.device)   # a copy
            return self._torch_idx[key]
        return arr

    def _check(self, x, dim, name):
        """``x`` a tensor or NumPy array of size ``self.dim`` along ``dim``; returns ``dim``
        made non-negative."""
        if not is_tensor(x) and not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a torch.Tensor (or a NumPy array); got "
                            f"{type(x).__name__}")
        dim = V.integer(dim, "dim")
        nd = x.ndim
        if not -nd <= dim < nd:
            raise ValueError(f"dim must be in [-{nd}, {nd}) for {name} of shape "
                             f"{tuple(x.shape)}; got {dim}")
        if x.shape[dim] != self.dim:
            raise ValueError(f"{name} must have size {self.dim} along dim {dim}; got shape "
                             f"{tuple(x.shape)}")
        return dim % nd

    def _gather(self, x, which, dim, name):
        dim = self._check(x, dim, name)
        idx = self._index(which, x)
        if is_tensor(x):
            return x.index_select(dim, idx)
        return np.take(x, idx, axis=dim)

    def to_kronecker(self, x, dim=0):
        """Torch order -> Kronecker order along ``dim`` (a new tensor; O(size of x))."""
        return self._gather(x, "perm", dim, "x")

    def to_torch(self, x, dim=0):
        """Kronecker order -> torch order along ``dim`` (a new tensor; O(size of x))."""
        return self._gather(x, "inverse", dim, "x")

    def split(self, x, dim=0):
        """The per-layer slices of a vector in torch order: [(W_k, b_k or None)], each W_k
        shaped (d_out, d_in) along ``dim`` (views for a tensor when the layout allows;
        NumPy arrays give copies).  ``x``: a tensor or NumPy array of size ``dim`` along
        ``dim``."""
        dim = self._check(x, dim, "x")
        out = []
        for s, a in zip(self.layers, self.offsets[:-1]):
            a = int(a)
            if is_tensor(x):
                w = x.narrow(dim, a, s.d_out * s.d_in).unflatten(dim, (s.d_out, s.d_in))
            else:
                w = np.take(x, np.arange(a, a + s.d_out * s.d_in), axis=dim)
                w = w.reshape(w.shape[:dim] + (s.d_out, s.d_in) + w.shape[dim + 1:])
            b = None
            if s.bias:
                c = a + s.d_out * s.d_in
                b = x.narrow(dim, c, s.d_out) if is_tensor(x) else np.take(
                    x, np.arange(c, c + s.d_out), axis=dim)
            out.append((w, b))
        return out

    def __repr__(self):
        parts = [f"{s.kind} {s.d_out}x{s.d_in}" + ("+b" if s.bias else "") for s in self.layers]
        return f"<ParameterLayout d={self.dim} layers=[{', '.join(parts)}]>"


def select_layers(model, layers=None, *, strict=True):
    """[(name, module)] of the Linear / Conv2d layers used, in the model's parameter order.

    Without ``layers``: every Linear / Conv2d layer with trainable parameters; ``strict``
    refuses a model with other trainable parameters (a layout must then cover exactly
    ``parameters_to_vector`` of the trainable parameters)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    supported = (torch.nn.Linear, torch.nn.Conv2d)
    holders = _holders(model, supported)
    named = dict(model.named_modules())
    owner = {}
    for name, mod in named.items():
        for pname, p in mod.named_parameters(recurse=False):
            owner[id(p)] = (name, mod, pname)
    if layers is None:
        chosen = []
        seen = set()
        others = []
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            tied = holders[id(p)]
            if len(tied) > 1 and any(sup for _, sup in tied):
                _refuse_tied(tied)
            name, mod, _ = owner[id(p)]
            if isinstance(mod, supported):
                if id(mod) not in seen:
                    seen.add(id(mod))
                    chosen.append((name, mod))
            else:
                others.append(pname)
        if others and strict:
            raise ValueError(f"model has trainable parameters outside nn.Linear / nn.Conv2d "
                             f"layers: {others[:5]}{' ...' if len(others) > 5 else ''}; pass "
                             "layers= to choose the layers, or freeze them")
        if not chosen:
            raise ValueError("model has no nn.Linear / nn.Conv2d layer with trainable parameters")
    else:
        if isinstance(layers, (str, torch.nn.Module)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of module names or modules; got "
                            f"{type(layers).__name__}")
        by_id = {id(m): n for n, m in named.items()}
        picked = {}
        for k, l in enumerate(layers):
            if isinstance(l, str):
                if l not in named:
                    raise ValueError(f"layers[{k}]: the model has no module named {l!r}")
                mod, name = named[l], l
            elif isinstance(l, torch.nn.Module):
                if id(l) not in by_id:
                    raise ValueError(f"layers[{k}] is not a module of the model")
                mod, name = l, by_id[id(l)]
            else:
                raise TypeError(f"layers[{k}] must be a module name or a module; got "
                                f"{type(l).__name__}")
            if not isinstance(mod, supported):
                raise TypeError(f"layers[{k}] ({name!r}) must be nn.Linear or nn.Conv2d; got "
                                f"{type(mod).__name__}")
            picked[id(mod)] = (name, mod)
        if not picked:
            raise ValueError("layers must name at least one layer")
        order = []
        for p in model.parameters():
            name, mod, _ = owner[id(p)]
            if id(mod) in picked and (name, mod) not in order:
                order.append((name, mod))
        chosen = order
    for name, mod in chosen:
        ps = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
        if not all(p.requires_grad for p in ps):
            raise ValueError(f"layer {name!r}: weight and bias must both be trainable")
        for p in ps:
            if len(holders[id(p)]) > 1:
                _refuse_tied(holders[id(p)])
    return chosen


def _holders(model, supported):
    """id(parameter) -> [(qualified name, held by a Linear / Conv2d)], one entry per module
    object holding it: more than one are tied weights.  (One module registered under two
    names is one holder: its parameters are counted once, and a module called twice in a
    forward pass is refused where that matters, by the statistics' capture.)"""
    holders = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            per = holders.setdefault(id(p), {})
            per.setdefault(id(mod), (f"{name}.{pname}" if name else pname,
                                     isinstance(mod, supported)))
    return {k: list(v.values()) for k, v in holders.items()}


def _refuse_tied(names):
    """The layouts, the captured per-sample statistics and the pruner treat each layer's
    parameters as its own: a shared one would be counted twice (a layout longer than
    ``parameters_to_vector``) or only one of its uses seen."""
    shown = [n for n, _ in names]
    raise ValueError(f"parameters shared between modules are not supported: {shown[0]!r} is "
                     f"also {shown[1:]} (tied weights); the layouts, statistics and pruning "
                     "count each layer's parameters as its own. Untie them, freeze the shared "
                     "parameter, or leave its layers out (layers=)")


class PermutedOperator(Operator):
    r"""An operator of the Kronecker order seen in torch order: P A Pᵀ.

    ``(P A Pᵀ) x = (A x[perm])[inverse]``: one gather before and one after the wrapped
    operator's product (O(d k) on top of it); ``diagonal`` and ``entry`` are the
    wrapped operator's, re-indexed.  Tensors in, tensors out: a ``torch.Tensor``
    argument gives a tensor back on its device and in its dtype (NumPy / CuPy arrays
    give arrays, as every operator of the library), also through the lazy algebra
    (``2 * P``, ``P + P``, ``P @ P``, ``x @ P``).

    Parameters
    ----------
    op : Operator acting in the Kronecker order of ``layout``
    layout : ParameterLayout

    Examples
    --------
    >>> import numpy as np, torch
    >>> import mfac_linalg as ml
    >>> from mfac_linalg.torch import ParameterLayout, PermutedOperator
    >>> lay = ParameterLayout([(2, 3, True)])
    >>> rng = np.random.default_rng(0)
    >>> a, g = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    >>> op = PermutedOperator(ml.kfac(a, g, 1e-3, bias=True), lay)
    >>> y = op.matvec(torch.ones(8, dtype=torch.float64))
    >>> type(y).__name__, y.shape, y.dtype
    ('Tensor', torch.Size([8]), torch.float64)
    """

    _tensors_out = True      # tensors in, tensors out (the base class's products)

    def __init__(self, op, layout):
        if not isinstance(op, Operator):
            raise TypeError(f"op must be an operator of mfac_linalg; got {type(op).__name__}")
        if not isinstance(layout, ParameterLayout):
            raise TypeError(f"layout must be a ParameterLayout; got {type(layout).__name__}")
        if op.shape[0] != layout.dim:
            raise ValueError(f"op has dimension {op.shape[0]} but layout has {layout.dim}")
        self._op = op
        self.layout = layout
        self._symmetric = op.symmetric
        xp = op.backend.xp
        self._perm = xp.asarray(layout.perm)
        self._inv = xp.asarray(layout.inverse)
        self._init_operator(layout.dim, op.dtype, op.backend)

    @property
    def operator(self):
        """The wrapped operator (Kronecker order)."""
        return self._op

    @property
    def _kind_of(self):
        """What ``block_diag(...).logdet()`` classifies (inverse-Fisher or forward): the
        wrapped operator, whatever methods this adapter forwards."""
        return self._op

    @property
    def blocks(self):
        """The wrapped operator's blocks (a block-diagonal operator), else [operator]."""
        return getattr(self._op, "blocks", [self._op])

    def _repr_fields(self):
        return [f"of={type(self._op).__name__}"]

    def _matmat(self, X):
        return self._op.matmat(X[self._perm])[self._inv]

    def _rmatmat(self, X):
        return self._op.rmatmat(X[self._perm])[self._inv]

    def _adjoint(self):
        return PermutedOperator(self._op.adjoint(), self.layout)

    def _diagonal(self):
        return self._op.diagonal()[self._inv]

    def _entry(self, i, j):
        return self._op.entry(int(self.layout.inverse[i]), int(self.layout.inverse[j]))

    def logdet(self):
        """The wrapped operator's log-determinant (a permutation leaves it unchanged)."""
        return self._op.logdet()

    def fisher(self):
        """The wrapped operator's ``fisher()``, in torch order."""
        return PermutedOperator(self._op.fisher(), self.layout)

    def inverse(self):
        """The wrapped operator's ``inverse()``, in torch order."""
        return PermutedOperator(self._op.inverse(), self.layout)


def _back(y, like):
    """A result as a tensor on ``like``'s device and dtype when ``like`` is a tensor; a
    tensor of integers or booleans gets the result's floating dtype (as NumPy input does):
    cast back to int or bool it would be truncated."""
    if is_tensor(like):
        floating = like.is_floating_point() or like.is_complex()
        return to_torch(y, dtype=like.dtype if floating else None, device=like.device)
    return y
