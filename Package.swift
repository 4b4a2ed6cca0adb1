// swift-tools-version:6.0
// NormKit: normalization methods for deep learning, under one Π → Φ → Ψ framework.
import PackageDescription

let package = Package(
    name: "NormKit",
    products: [
        // MARK: - Public API
        .library(name: "NormKit", targets: ["NormKit"]),
        /// The training harness: small networks with any normalizer in any slot (needs BLAS).
        .library(name: "NormKitTraining", targets: ["Training", "Whitening"]),
        .executable(name: "normkit", targets: ["normkit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0")
    ],
    targets: [
        // MARK: - Public API
        /// Umbrella module: `import NormKit` brings in every layer below.
        .target(
            name: "NormKit",
            dependencies: ["TensorCore", "NormKernels", "Normalization", "NormIO"]
        ),
        .executableTarget(
            name: "normkit",
            dependencies: ["NormKitCLI"]
        ),

        // MARK: - Implementation details
        /// Dense tensors of Float and Double with value semantics.
        .target(name: "TensorCore"),
        /// Stateless kernels over raw buffers; each fast kernel sits beside its reference.
        .target(name: "NormKernels", exclude: ["README.md"]),
        /// The Π → Φ → Ψ core and the public normalization layers.
        .target(name: "Normalization", dependencies: ["TensorCore", "NormKernels"]),
        /// NumPy `.npy` and safetensors readers and writers.
        .target(name: "NormIO", dependencies: ["TensorCore"]),
        /// CBLAS from OpenBLAS on Linux (Accelerate provides it on Apple platforms).
        .systemLibrary(
            name: "COpenBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        /// Layers for small networks, optimisers, data, checkpoints, experiments.
        .target(
            name: "Training",
            dependencies: [
                "NormKit",
                .target(name: "COpenBLAS", condition: .when(platforms: [.linux])),
            ],
            exclude: ["Resources/README.md"],
            resources: [.copy("Resources/digits.safetensors")]),
        /// LAPACKE on Linux (Accelerate provides LAPACK on Apple platforms).
        .systemLibrary(
            name: "CLAPACKE", pkgConfig: "lapacke", providers: [.apt(["liblapacke-dev"])]),
        /// Whitening normalizers (decorrelated BN, IterNorm, Switchable Whitening) and Kalman
        /// Normalization.
        .target(
            name: "Whitening",
            dependencies: [
                "NormKit", "Training",
                .target(name: "CLAPACKE", condition: .when(platforms: [.linux])),
            ]),
        /// The `normkit` commands, as a library so that tests can run them in-process.
        .target(
            name: "NormKitCLI",
            dependencies: [
                "NormKit",
                "Training",
                "Whitening",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: - Tests
        /// Fixture loading and comparison helpers shared by the test targets.
        .target(name: "NormTestSupport", dependencies: ["NormKit"], path: "Tests/_TestSupport"),
        .testTarget(name: "TensorCoreTests", dependencies: ["TensorCore"]),
        .testTarget(name: "WhiteningTests", dependencies: ["Whitening", "NormTestSupport"]),
        .testTarget(name: "NormKernelsTests", dependencies: ["NormKernels", "NormTestSupport"]),
        .testTarget(name: "NormalizationTests", dependencies: ["NormKit", "NormTestSupport"]),
        .testTarget(name: "NormIOTests", dependencies: ["NormIO", "NormTestSupport"]),
        .testTarget(name: "NormKitCLITests", dependencies: ["NormKitCLI", "NormTestSupport"]),
        .testTarget(
            name: "TrainingTests", dependencies: ["Training", "NormKitCLI", "NormTestSupport"]),
    ]
)
