"""Data-free compression: a trained float model into a low-bit or binary student, no data.

- :mod:`.bn_stats`: the batch-norm statistics loss (:class:`BNStatistics`);
- :mod:`.generators`: class-conditional generators (:class:`GDFQGenerator`, the baseline) and
  GDFQ's reconstruction loss;
- :mod:`.autorecon`: AutoReCon's generator supernet and derived generator
  (:class:`SearchedGenerator`, :class:`GeneratorGenotype`);
- :mod:`.fit`: training a generator (and searching one) against the teacher, and ZeroQ's
  optimised inputs;
- :mod:`.students`: the binary (``bireal18``) and fake-quantised (``int8``, ``int4``) students;
- :mod:`.compress`: the whole run behind ``bitfleet compress`` (:func:`compress`).

Example::

    from toolkit.datafree import CompressConfig, compress
    result = compress(CompressConfig("runs/teacher", to="int4", generator="autorecon"), "runs/q4")

The command line is ``bitfleet compress`` (docs/datafree.md).
"""

from .autorecon import GENERATOR_OPS, GeneratorGenotype, SearchedGenerator
from .bn_stats import BNStatistics, NoBatchNormError, batch_norm_layers
from .compress import GENERATORS, CompressConfig, CompressResult, TeacherError, compress, distill
from .fit import fit_generator, fit_inputs
from .generators import LATENT_DIM, GDFQGenerator, reconstruction_loss
from .students import STUDENTS, make_student

__all__ = [
    "GENERATORS",
    "GENERATOR_OPS",
    "LATENT_DIM",
    "STUDENTS",
    "BNStatistics",
    "CompressConfig",
    "CompressResult",
    "GDFQGenerator",
    "GeneratorGenotype",
    "NoBatchNormError",
    "SearchedGenerator",
    "TeacherError",
    "batch_norm_layers",
    "compress",
    "distill",
    "fit_generator",
    "fit_inputs",
    "make_student",
    "reconstruction_loss",
]
