import NormKit
import NormKitCLI
import NormTestSupport
import Testing

/// Shard sizes and the gather of `ShardedApply` on one process (the multi-rank runs are in
/// NormMPITests).
@Suite("Sharded apply")
struct ShardedApplyTests {
    @Test func evenSplitGivesTheFirstRanksOneMore() throws {
        #expect(try ShardedApply.shardSizes(batch: 8, ranks: 3, spec: nil) == [3, 3, 2])
        #expect(try ShardedApply.shardSizes(batch: 2, ranks: 4, spec: nil) == [1, 1, 0, 0])
        #expect(try ShardedApply.shardSizes(batch: 8, ranks: 3, spec: "3,0,5") == [3, 0, 5])
    }

    @Test func badSpecificationsAreNamed() {
        #expect(throws: ShardError.invalid("'3,0' has 2 sizes for 3 ranks")) {
            try ShardedApply.shardSizes(batch: 3, ranks: 3, spec: "3,0")
        }
        #expect(throws: ShardError.invalid("the sizes in '3,0,4' add up to 7, the batch has 8")) {
            try ShardedApply.shardSizes(batch: 8, ranks: 3, spec: "3,0,4")
        }
        #expect(throws: ShardError.self) {
            try ShardedApply.shardSizes(batch: 8, ranks: 2, spec: "9,-1")
        }
        #expect(throws: ShardError.self) {
            try ShardedApply.shardSizes(batch: 8, ranks: 2, spec: "x,8")
        }
    }

    @Test func oneRankReturnsTheWholeBatchResult() throws {
        var g = SeededGenerator(seed: 4)
        let x = try Tensor<Double>.randomNormal(shape: [5, 2, 3], using: &g)
        let dy = try Tensor<Double>.randomNormal(shape: [5, 2, 3], using: &g)
        let synced = try SyncBatchNorm<Double>(featureCount: 2, communicator: LocalCommunicator())
        var cache: NormLayer<Double>.Cache?
        let result = try #require(
            try ShardedApply.run(
                input: x, outputGradient: dy, shardSizes: [5], communicator: LocalCommunicator(),
                forward: { slice in
                    let (y, c) = try synced.forward(slice, mode: .training)
                    cache = c
                    return y
                },
                backward: { d in
                    let g = try synced.backward(d, cache: cache!)
                    return (g.input, ["weight": g.scale!, "bias": g.offset!])
                }))
        let plain = try BatchNorm<Double>(featureCount: 2)
        let (y, c) = try plain.forward(x, mode: .training)
        let gp = try plain.backward(dy, cache: c)
        #expect(Comparison(result.output.scalars, y.scalars).relative < 1e-12)
        #expect(Comparison(result.inputGradient!.scalars, gp.input.scalars).relative < 1e-12)
        #expect(
            Comparison(result.parameterGradients["weight"]!.scalars, gp.scale!.scalars).relative
                < 1e-12)
    }
}
