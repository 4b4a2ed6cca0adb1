// NormKit: one import for the whole library.
@_exported import Conditional
@_exported import LinearAlgebra
@_exported import NormIO
@_exported import NormKernels
@_exported import Normalization
@_exported import TensorCore
@_exported import Whitening
