// swift-tools-version:6.0
// NormKit: normalization methods for deep learning, under one Π → Φ → Ψ framework.
import PackageDescription

let package = Package(
    name: "NormKit",
    products: [
        // MARK: - Public API
        .library(name: "NormKit", targets: ["NormKit"]),
        /// The training harness: small networks with any normalizer in any slot (needs BLAS).
        .library(name: "NormKitTraining", targets: ["Training", "Studies"]),
        .executable(name: "normkit", targets: ["normkit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
    ],
    targets: [
        // MARK: - Public API
        /// Umbrella module: `import NormKit` brings in every normalizer (standard, learned,
        /// whitening, conditional) and the registry that names them.
        .target(
            name: "NormKit",
            dependencies: [
                "TensorCore", "NormKernels", "Normalization", "NormIO", "LinearAlgebra",
                "Whitening", "Conditional",
            ]
        ),
        .executableTarget(
            name: "normkit",
            dependencies: ["NormKitCLI"]
        ),

        // MARK: - Implementation details
        /// Dense tensors of Float and Double with value semantics.
        .target(name: "TensorCore"),
        /// Stateless kernels over raw buffers; each fast kernel sits beside its reference.
        .target(name: "NormKernels", dependencies: ["CNormSIMD"], exclude: ["README.md"]),
        /// AVX2 + FMA versions of the kernels' inner loops, chosen at run time on x86-64 (C,
        /// because Swift cannot build one function for a CPU feature without unsafeFlags).
        .target(name: "CNormSIMD"),
        /// The Π → Φ → Ψ core, the `Normalizing` protocol and the activation normalizers that
        /// need no BLAS.
        .target(name: "Normalization", dependencies: ["TensorCore", "NormKernels"]),
        /// NumPy `.npy` and safetensors readers and writers.
        .target(name: "NormIO", dependencies: ["TensorCore"]),
        /// CBLAS from OpenBLAS on Linux (Accelerate provides it on Apple platforms).
        .systemLibrary(
            name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        /// LAPACKE on Linux (Accelerate provides LAPACK on Apple platforms).
        .systemLibrary(
            name: "CLAPACKE", pkgConfig: "lapacke", providers: [.apt(["liblapacke-dev"])]),
        /// zlib, to read gzip-compressed data sets (Fashion-MNIST) without a hand-written inflater.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        /// Open MPI's C API (Debian's libopenmpi-dev; only the distribution target uses it).
        .systemLibrary(
            name: "CMPI", pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev", "openmpi-bin"]), .brew(["open-mpi"])]),
        /// `MPICommunicator`: synchronized statistics and data-parallel training over Open MPI;
        /// only the command-line tool and the MPI tests depend on it, so the library builds
        /// without MPI.
        .target(name: "NormMPI", dependencies: ["Normalization", "CMPI"]),
        /// GEMM and the small dense matrices of the whitening algebra, over BLAS and LAPACK.
        .target(
            name: "LinearAlgebra",
            dependencies: [
                "TensorCore", "CNormSIMD",
                .target(name: "COpenBLAS", condition: .when(platforms: [.linux])),
                .target(name: "CLAPACKE", condition: .when(platforms: [.linux])),
            ]),
        /// Whitening normalizers (decorrelated BN, IterNorm, Switchable Whitening).
        .target(
            name: "Whitening",
            dependencies: ["TensorCore", "NormKernels", "Normalization", "LinearAlgebra"]),
        /// Conditional normalizers that need GEMM (SPADE's convolutions).
        .target(
            name: "Conditional",
            dependencies: ["TensorCore", "NormKernels", "Normalization", "LinearAlgebra"]),
        /// Layers for small networks, optimisers, data, checkpoints.
        .target(
            name: "Training",
            dependencies: ["NormKit", "LinearAlgebra", "CZlib"],
            exclude: ["Resources/README.md", "FashionMNIST.md"],
            resources: [.copy("Resources/digits.safetensors")]),
        /// Experiments and their HTML/SVG reports, above the training harness.
        .target(name: "Studies", dependencies: ["NormKit", "Training"]),
        /// The `normkit` commands, as a library so that tests can run them in-process; only
        /// argument parsing and file handling, the work is in the libraries.
        .target(
            name: "NormKitCLI",
            dependencies: [
                "NormKit",
                "Training",
                "Studies",
                "NormMPI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: - Tests
        /// Fixture loading and comparison helpers shared by the test targets.
        .target(name: "NormTestSupport", dependencies: ["NormKit"], path: "Tests/_TestSupport"),
        .testTarget(name: "TensorCoreTests", dependencies: ["TensorCore"]),
        .testTarget(name: "WhiteningTests", dependencies: ["NormKit", "NormTestSupport"]),
        .testTarget(
            name: "NormKernelsTests", dependencies: ["NormKernels", "CNormSIMD", "NormTestSupport"]
        ),
        .testTarget(name: "NormalizationTests", dependencies: ["NormKit", "NormTestSupport"]),
        .testTarget(name: "NormIOTests", dependencies: ["NormIO", "NormTestSupport"]),
        .testTarget(
            name: "NormKitCLITests", dependencies: ["NormKitCLI", "Training", "NormTestSupport"]),
        /// Launches `mpirun -np 2` and `-np 3` on `normkit sync-check` and `normkit train`.
        /// (They never start MPI in the test process: an MPI singleton must not launch mpirun.)
        .testTarget(name: "NormMPITests", dependencies: ["NormIO", "TensorCore"]),
        /// The whitened layers, gradient normalization and their training options (no CLI).
        .testTarget(
            name: "WhitenedTrainingTests", dependencies: ["Training", "NormTestSupport"]),
        .testTarget(
            name: "TrainingTests",
            dependencies: ["Training", "Studies", "NormTestSupport"]),
    ]
)
