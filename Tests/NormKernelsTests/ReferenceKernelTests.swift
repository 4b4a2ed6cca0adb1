import NormKernels
import Testing

@Suite("Reduction plans and the reference kernel")
struct ReferenceKernelTests {
    /// Brute force: the set of an element is its multi-index with reduced axes dropped.
    static func bruteForceSets(_ plan: ReductionPlan) -> [Int] {
        let shape = plan.viewShape
        let kept = shape.indices.filter { !plan.reduced[$0] }
        return (0..<plan.elementCount).map { flat in
            var rest = flat
            var index = [Int](repeating: 0, count: shape.count)
            for axis in shape.indices.reversed() {
                index[axis] = rest % shape[axis]
                rest /= shape[axis]
            }
            return kept.reduce(0) { $0 * shape[$1] + index[$1] }
        }
    }

    @Test(arguments: [
        ([3, 4], [true, false]), ([1, 3, 7], [true, false, true]),
        ([2, 3, 2, 5], [false, true, false, true]),
        ([17, 1, 3], [false, false, true]), ([2, 2, 3, 2, 2], [true, false, true, true, false]),
        ([4], [true]), ([5, 6], [false, false]), ([63, 2], [true, true]),
    ])
    func setIndicesMatchBruteForce(_ shape: [Int], _ reduced: [Bool]) {
        let plan = ReductionPlan(viewShape: shape, reduced: reduced)
        #expect(plan.setIndices() == Self.bruteForceSets(plan))
        #expect(plan.setCount * plan.setSize == plan.elementCount)
        #expect(plan.statisticShape == zip(shape, reduced).compactMap { $1 ? nil : $0 })
    }

    @Test func momentsSurviveALargeOffset() {
        // 1000 + 0.05·k: the one-pass E[x²] − E[x]² in Float gives garbage here; two passes
        // in Double recover the variance to full precision.
        let values: [Float] = (0..<64).map { 1000 + 0.05 * Float($0 % 8 - 4) }
        let op = ReferenceNormKernel.Operation(centers: true, scales: true, epsilon: 0)
        let moments = values.withUnsafeBufferPointer {
            ReferenceNormKernel.moments(
                $0, setIndex: [Int](repeating: 0, count: 64), setCount: 1, operation: op)
        }
        let exact = values.map(Double.init)
        let mean = exact.reduce(0, +) / 64
        let variance = exact.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 64
        #expect(abs(moments.mean[0] - mean) < 1e-12)
        #expect(abs(moments.variance[0] - variance) / variance < 1e-10)
    }

    @Test func rmsScalingUsesTheMeanSquare() {
        let values: [Double] = [3, 4]
        let op = ReferenceNormKernel.Operation(centers: false, scales: true, epsilon: 0)
        let moments = values.withUnsafeBufferPointer {
            ReferenceNormKernel.moments($0, setIndex: [0, 0], setCount: 1, operation: op)
        }
        #expect(moments.mean == [0])
        #expect(moments.variance == [12.5])
    }

    @Test func parameterIndexingFollowsTheChannelAxis() {
        // [N=2, C=3, L=2]: channel stride 2.
        let indexing = ParameterIndexing(divisor: 2, modulus: 3)
        #expect((0..<12).map { indexing($0) } == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    }
}
