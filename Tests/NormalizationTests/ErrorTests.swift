import NormKit
import Testing

/// Every bad input gives a typed error with a clear message, and leaves the layer unchanged.
@Suite("Bad input")
struct ErrorTests {
    static func x(_ shape: [Int], value: Double = 1) throws -> Tensor<Double> {
        var g = SeededGenerator(seed: 1)
        return try Tensor.randomNormal(shape: shape, mean: value, using: &g)
    }

    /// Asserts that `body` throws `expected` and that the layer's state is unchanged.
    static func expectError(
        _ expected: NormError, layer: NormLayer<Double>, _ body: () throws -> Void,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let state = layer.state()
        let running = layer.runningStatistics
        #expect(throws: expected, sourceLocation: sourceLocation) { try body() }
        #expect(layer.runningStatistics == running, sourceLocation: sourceLocation)
        #expect(layer.state().tensors == state.tensors, sourceLocation: sourceLocation)
        #expect(!expected.description.isEmpty)
    }

    @Test func wrongRank() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        Self.expectError(
            .invalidRank(layer: "BatchNorm", expected: "rank ≥ 2 (N, C, …)", shape: [3]), layer: bn
        ) {
            _ = try bn.forward(try Self.x([3]), mode: .training)
        }
        let inorm = try InstanceNorm<Double>(featureCount: 3)
        Self.expectError(
            .invalidRank(
                layer: "InstanceNorm", expected: "rank ≥ 3 (N, C, spatial…)", shape: [2, 3]),
            layer: inorm
        ) { _ = try inorm.forward(try Self.x([2, 3]), mode: .training) }
    }

    @Test func channelCountThatDoesNotMatch() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        Self.expectError(
            .channelMismatch(layer: "BatchNorm", expected: 3, actual: 4, shape: [2, 4, 5]),
            layer: bn
        ) {
            _ = try bn.forward(try Self.x([2, 4, 5]), mode: .training)
        }
        let nhwc = try BatchNorm<Double>(featureCount: 3, layout: .channelsLast)
        Self.expectError(
            .channelMismatch(layer: "BatchNorm", expected: 3, actual: 5, shape: [2, 3, 5]),
            layer: nhwc
        ) {
            _ = try nhwc.forward(try Self.x([2, 3, 5]), mode: .training)
        }
    }

    @Test func normalizedShapeThatDoesNotMatch() throws {
        let ln = try LayerNorm<Double>(normalizedShape: [4, 5])
        Self.expectError(
            .normalizedShapeMismatch(layer: "LayerNorm", expected: [4, 5], shape: [2, 5, 4]),
            layer: ln
        ) {
            _ = try ln.forward(try Self.x([2, 5, 4]), mode: .training)
        }
    }

    @Test func groupsThatDoNotDivideChannels() {
        #expect(throws: NormError.groupsDoNotDivideChannels(groups: 3, channels: 8)) {
            _ = try GroupNorm<Double>(groupCount: 3, channelCount: 8)
        }
        #expect(throws: NormError.groupsDoNotDivideChannels(groups: 4, channels: 6)) {
            _ = try Normalizer.Partition.group(4).plan(for: [2, 6, 3], layout: .channelsFirst)
        }
    }

    @Test func singleValuePerChannelInTrainingBatchNorm() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        Self.expectError(.singleValuePerStatistic(layer: "BatchNorm", shape: [1, 3]), layer: bn) {
            _ = try bn.forward(try Self.x([1, 3]), mode: .training)
        }
        // Inference with one sample is fine.
        _ = try bn.forward(try Self.x([1, 3]), mode: .inference)
        // So is one sample with spatial extent.
        _ = try bn.forward(try Self.x([1, 3, 2]), mode: .training)
    }

    @Test func singleValuePoliciesOfferAlternatives() throws {
        let x = try Self.x([1, 2], value: 5)
        let running = try BatchNorm<Double>(
            featureCount: 2, singleValuePolicy: .useRunningStatistics)
        let before = running.runningStatistics
        let y = try running.forward(x, mode: .training).output
        #expect(y == (try running.forward(x, mode: .inference).output))
        #expect(running.runningStatistics == before)

        let instance = try BatchNorm<Double>(
            featureCount: 2, singleValuePolicy: .useInstanceStatistics)
        instance.offset = Tensor([0.25, -1])
        #expect(try instance.forward(x, mode: .training).output.scalars == [0.25, -1])
        #expect(instance.runningStatistics?.batchesTracked == 0)

        let untracked = try BatchNorm<Double>(
            featureCount: 2, trackRunningStatistics: false, singleValuePolicy: .useRunningStatistics
        )
        #expect(throws: NormError.runningStatisticsUnavailable(layer: "BatchNorm")) {
            _ = try untracked.forward(x, mode: .training)
        }
    }

    @Test func instanceNormOverOnePositionInTraining() throws {
        let inorm = try InstanceNorm<Double>(featureCount: 2, trackRunningStatistics: true)
        Self.expectError(
            .singleValuePerStatistic(layer: "InstanceNorm", shape: [3, 2, 1]), layer: inorm
        ) {
            _ = try inorm.forward(try Self.x([3, 2, 1]), mode: .training)
        }
    }

    @Test func zeroSizeReducedAxesAreRefused() throws {
        let ln = try LayerNorm<Double>(normalizedShape: [3])
        Self.expectError(
            .normalizedShapeMismatch(layer: "LayerNorm", expected: [3], shape: [2, 0]), layer: ln
        ) {
            _ = try ln.forward(try Tensor(zeros: [2, 0]), mode: .training)
        }
        let bn = try BatchNorm<Double>(featureCount: 2)
        Self.expectError(.emptyTensor(layer: "BatchNorm", shape: [3, 2, 0]), layer: bn) {
            _ = try bn.forward(try Tensor(zeros: [3, 2, 0]), mode: .training)
        }
        let inorm = try InstanceNorm<Double>(featureCount: 2)
        Self.expectError(.emptyTensor(layer: "InstanceNorm", shape: [3, 2, 0]), layer: inorm) {
            _ = try inorm.forward(try Tensor(zeros: [3, 2, 0]), mode: .inference)
        }
        #expect(
            NormError.emptyTensor(layer: "BatchNorm", shape: [3, 2, 0]).description.contains(
                "size 0"))
    }

    @Test func parameterShapesThatDoNotMatch() throws {
        let bn = try BatchNorm<Double>(featureCount: 3)
        Self.expectError(
            .parameterShapeMismatch(name: "weight", expected: [3], actual: [4]), layer: bn
        ) {
            try bn.load(["weight": Tensor([1, 1, 1, 1]), "bias": Tensor([0, 0, 0])])
        }
        Self.expectError(
            .parameterShapeMismatch(name: "running_var", expected: [3], actual: [2]), layer: bn
        ) {
            try bn.load(["running_var": Tensor([1, 1])])
        }
        Self.expectError(
            .parameterShapeMismatch(name: "gamma", expected: [], actual: [3]), layer: bn
        ) {
            try bn.load(["gamma": Tensor([1, 1, 1])])
        }
        // Assigned directly, a wrong shape is caught on the next call, before any update.
        bn.scale = Tensor([1, 2])
        #expect(
            throws: NormError.parameterShapeMismatch(name: "weight", expected: [3], actual: [2])
        ) {
            _ = try bn.forward(try Self.x([4, 3]), mode: .training)
        }
        #expect(bn.runningStatistics?.batchesTracked == 0)
        bn.scale = Tensor([1, 1, 1])
        bn.runningStatistics?.mean = Tensor([0, 0])
        #expect(
            throws: NormError.parameterShapeMismatch(
                name: "running_mean", expected: [3], actual: [2])
        ) {
            _ = try bn.forward(try Self.x([4, 3]), mode: .training)
        }
    }

    @Test func nanInputNeverCorruptsRunningStatistics() throws {
        let bn = try BatchNorm<Double>(featureCount: 2)
        var x = try Self.x([4, 2])
        x[1, 0] = .nan
        Self.expectError(.nonFiniteStatistics(layer: "BatchNorm"), layer: bn) {
            _ = try bn.forward(x, mode: .training)
        }
        #expect(bn.runningStatistics?.batchesTracked == 0)
    }

    @Test func gradientOfTheWrongShape() throws {
        let ln = try LayerNorm<Double>(normalizedShape: [3])
        let (_, cache) = try ln.forward(try Self.x([2, 3]), mode: .training)
        #expect(throws: NormError.gradientShapeMismatch(expected: [2, 3], actual: [3, 2])) {
            _ = try ln.backward(try Self.x([3, 2]), cache: cache)
        }
    }

    @Test func invalidHyperparameters() {
        #expect(throws: NormError.self) { _ = try BatchNorm<Double>(featureCount: 0) }
        #expect(throws: NormError.self) { _ = try BatchNorm<Double>(featureCount: 2, epsilon: -1) }
        #expect(throws: NormError.self) {
            _ = try BatchNorm<Double>(featureCount: 2, epsilon: .nan)
        }
        #expect(throws: NormError.self) {
            _ = try BatchNorm<Double>(featureCount: 2, momentum: .exponential(weightOfNew: 1.5))
        }
        #expect(throws: NormError.self) { _ = try LayerNorm<Double>(normalizedShape: []) }
        #expect(throws: NormError.self) { _ = try RMSNorm<Double>(normalizedShape: [0]) }
        #expect(throws: NormError.invalidAxes(axes: [0, 0], rank: 3)) {
            _ = try Normalizer.Partition.axes([0, 0]).plan(for: [1, 2, 3], layout: .channelsFirst)
        }
        #expect(throws: NormError.invalidAxes(axes: [3], rank: 3)) {
            _ = try Normalizer.Partition.axes([3]).plan(for: [1, 2, 3], layout: .channelsFirst)
        }
    }

    @Test func messagesNameTheProblem() {
        #expect(
            NormError.groupsDoNotDivideChannels(groups: 3, channels: 8).description.contains(
                "3 groups"))
        #expect(
            NormError.channelMismatch(layer: "BatchNorm", expected: 3, actual: 4, shape: [2, 4])
                .description
                .contains("3 channels"))
        #expect(
            NormError.singleValuePerStatistic(layer: "BatchNorm", shape: [1, 3]).description
                .contains("single value"))
    }
}
