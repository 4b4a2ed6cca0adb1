import Foundation
import NormKit

/// The learning-rate schedule over training steps.
public enum LearningRateSchedule: Sendable, Hashable {
    /// Constant.
    case constant
    /// Multiply by `factor` at each milestone step.
    case step(milestones: [Int], factor: Double)
    /// Cosine from the base rate to 0 over `totalSteps`.
    case cosine(totalSteps: Int)

    /// The multiplier of the base rate at a step.
    public func multiplier(atStep t: Int) -> Double {
        switch self {
        case .constant: return 1
        case .step(let milestones, let factor):
            return pow(factor, Double(milestones.filter { t >= $0 }.count))
        case .cosine(let total):
            return 0.5 * (1 + cos(Double.pi * min(Double(t) / Double(max(total, 1)), 1)))
        }
    }
}

/// Stochastic gradient descent with momentum and weight decay (PyTorch's `torch.optim.SGD`),
/// with per-group learning-rate multipliers and weight decay.
///
/// ```
/// g ← ∇ + λ·w,  v ← μ·v + g,  w ← w − η·v
/// ```
public final class SGD<Scalar: NormScalar> {
    /// Settings of one parameter group.
    public struct Group: Sendable, Hashable {
        /// Multiplier of the base learning rate.
        public var learningRateScale: Double
        /// λ.
        public var weightDecay: Double

        /// Creates a group setting.
        public init(learningRateScale: Double = 1, weightDecay: Double) {
            self.learningRateScale = learningRateScale
            self.weightDecay = weightDecay
        }
    }

    /// η.
    public var learningRate: Double
    /// μ.
    public var momentum: Double
    /// Settings by group name; unknown groups use `"default"`.
    public var groups: [String: Group]
    /// The schedule.
    public var schedule: LearningRateSchedule
    /// Steps taken.
    public var step = 0
    /// v per parameter name.
    public var velocity: [String: Tensor<Scalar>] = [:]

    /// Creates an optimiser.
    public init(
        learningRate: Double, momentum: Double = 0.9, weightDecay: Double = 5e-4,
        groups: [String: Group] = [:], schedule: LearningRateSchedule = .constant
    ) {
        self.learningRate = learningRate
        self.momentum = momentum
        self.schedule = schedule
        var all = groups
        if all["default"] == nil { all["default"] = Group(weightDecay: weightDecay) }
        self.groups = all
    }

    /// The learning rate of the current step.
    public var currentLearningRate: Double { learningRate * schedule.multiplier(atStep: step) }

    /// Updates every parameter from its gradient, then clears the gradients.
    public func update(_ parameters: [Parameter<Scalar>]) throws {
        let rate = currentLearningRate
        for p in parameters {
            if p.isFrozen {
                velocity[p.name] = nil
                p.zeroGradient()
                continue
            }
            let group = groups[p.group] ?? groups["default"]!
            let eta = rate * group.learningRateScale
            var v = try velocity[p.name] ?? Tensor<Scalar>(zeros: p.value.shape)
            var w = p.value
            let g = p.gradient
            let count = w.count
            for i in 0..<count {
                let grad = Double(g[flat: i]) + group.weightDecay * Double(w[flat: i])
                let vi = momentum * Double(v[flat: i]) + grad
                v[flat: i] = Scalar(vi)
                w[flat: i] = Scalar(Double(w[flat: i]) - eta * vi)
            }
            velocity[p.name] = v
            p.value = w
            p.zeroGradient()
        }
        step += 1
    }
}
