import Foundation
import NormKit
import Testing

/// The value types the layers share: channel affine, mixture logits and running averages.
@Suite("Shared parts")
struct SharedPartsTests {
    /// A loss L = Σ r·y with fixed pseudo-random r, so dL/dy = r.
    static func weights(_ count: Int, seed: Double) -> [Double] {
        (0..<count).map { sin(Double($0) * 1.7 + seed) }
    }

    @Test func channelAffineBackwardMatchesFiniteDifferences() throws {
        let (n, c, l) = (2, 3, 4)
        var affine = try ChannelAffine<Double>(channelCount: c)
        affine.scale = Tensor([0.5, -1.25, 2])
        affine.offset = Tensor([0.1, 0.2, -0.3])
        let xhat = Self.weights(n * c * l, seed: 0.3)
        let r = Self.weights(n * c * l, seed: 1.1)
        func loss(_ a: ChannelAffine<Double>, _ x: [Double]) throws -> Double {
            var y = x
            try a.apply(to: &y, batch: n, spatial: l)
            return zip(y, r).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let g = try affine.backward(r, normalized: xhat, batch: n, spatial: l)
        let h = 1e-6
        for i in [0, 5, 13, 23] {
            var plus = xhat
            var minus = xhat
            plus[i] += h
            minus[i] -= h
            let fd = (try loss(affine, plus) - loss(affine, minus)) / (2 * h)
            #expect(abs(fd - g.normalizedGradient[i]) < 1e-8, "dx̂[\(i)]")
        }
        for ch in 0..<c {
            for (isScale, analytic) in [(true, g.scale[ch]), (false, g.offset[ch])] {
                var plus = affine
                var minus = affine
                if isScale {

                    var p = plus.scale.scalars
                    var m = minus.scale.scalars
                    p[ch] += h
                    m[ch] -= h
                    plus.scale = try Tensor(shape: [c], scalars: p)
                    minus.scale = try Tensor(shape: [c], scalars: m)
                } else {
                    var p = plus.offset.scalars
                    var m = minus.offset.scalars
                    p[ch] += h
                    m[ch] -= h
                    plus.offset = try Tensor(shape: [c], scalars: p)
                    minus.offset = try Tensor(shape: [c], scalars: m)
                }
                let fd = (try loss(plus, xhat) - loss(minus, xhat)) / (2 * h)
                #expect(abs(fd - analytic) < 1e-8, "\(isScale ? "dγ" : "dβ")[\(ch)]")
            }
        }
        var wrong = [Double](repeating: 0, count: 5)
        #expect(throws: NormError.self) { try affine.apply(to: &wrong, batch: n, spatial: l) }
        #expect(wrong == [Double](repeating: 0, count: 5), "a refused call changes nothing")
    }

    @Test func mixtureLogitGradientsMatchFiniteDifferences() throws {
        let a = [0.7, -1.3, 0.4]
        for weighting in [MixtureWeighting.softmax, .sparsestMax(radius: 0.3)] {
            let logits = MixtureLogits<Double>(logits: Tensor([0.2, 0.5, -0.1]))
            let analytic = logits.evaluate(weighting).logitGradient(a)
            let h = 1e-6
            for l in 0..<3 {
                var p = logits.logits.scalars
                var m = p
                p[l] += h
                m[l] -= h
                func value(_ v: [Double]) -> Double {
                    let w = MixtureLogits<Double>(logits: Tensor(v)).evaluate(weighting).weights
                    return zip(w, a).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let fd = (value(p) - value(m)) / (2 * h)
                #expect(abs(fd - analytic[l]) < 1e-7, "\(weighting) dv[\(l)]")
            }
        }
        var frozen = MixtureLogits<Double>(logits: Tensor([0.1, 0.9, 0.0]))
        let dense = frozen.freezeIfOneHot([0.1, 0.9, 0])
        #expect(!dense, "not one-hot: stays free")
        let oneHot = frozen.freezeIfOneHot([0, 1, 0])
        #expect(oneHot)
        #expect(frozen.logits.scalars == [0, 1, 0])
        #expect(frozen.evaluate(.softmax).weights == [0, 1, 0])
        #expect(frozen.evaluate(.softmax).logitGradient(a) == [0, 0, 0])
    }

    @Test func runningAverageFollowsMomentumAndCumulativeRules() throws {
        var exponential = RunningAverage(momentum: .exponential(weightOfNew: 0.25))
        let f = exponential.advance()
        #expect(f == 0.25)
        #expect(exponential.batchesTracked == 1)
        #expect(RunningAverage.blend([4, 8], toward: [0, 0], weightOfNew: f) == [3, 6])
        // Without counting, the exponential rule leaves the counter alone.
        _ = exponential.advance(countingEveryBatch: false)
        #expect(exponential.batchesTracked == 1)
        // Cumulative: the k-th batch weighs 1/k, so the estimate is the plain average.
        var cumulative = RunningAverage(momentum: .cumulative)
        var estimate = [0.0]
        for s in [2.0, 4.0, 9.0] {
            let w = cumulative.advance(countingEveryBatch: false)
            estimate = RunningAverage.blend(estimate, toward: [s], weightOfNew: w)
        }
        #expect(abs(estimate[0] - 5) < 1e-12)
        #expect(cumulative.batchesTracked == 3)
        // The counter saturates instead of wrapping.
        var full = RunningAverage(momentum: .cumulative, batchesTracked: .max)
        _ = full.advance()
        full.countEmptyBatch()
        #expect(full.batchesTracked == .max)
    }

    @Test func runningStatisticsUpdateIsAllOrNothing() throws {
        let running = try RunningStatistics<Float>(shape: [2], momentum: .pytorchDefault)
        let updated = try #require(running.updated(batchMean: [1, 2], batchVariance: [3, 5]))
        let f = 0.1
        let expectedMean: [Double] = [f * 1, f * 2]
        let expectedVariance: [Double] = [(1 - f) * 1 + f * 3, (1 - f) * 1 + f * 5]
        #expect(updated.mean.scalars == expectedMean.map { Float($0) })
        #expect(updated.variance.scalars == expectedVariance.map { Float($0) })
        #expect(updated.batchesTracked == 1)
        #expect(running.updated(batchMean: [1e40, 0], batchVariance: [1, 1]) == nil)
    }
}
