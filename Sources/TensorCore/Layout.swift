/// Where the channel axis sits in an activation tensor.
///
/// PyTorch's default is channels-first (`[N, C, H, W]`); TensorFlow's and most fast CPU
/// kernels' is channels-last (`[N, H, W, C]`). Rank-2 tensors `[N, C]` are the same in both.
public enum Layout: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// `[N, C, spatial…]` (NCHW), PyTorch's default.
    case channelsFirst = "nchw"
    /// `[N, spatial…, C]` (NHWC).
    case channelsLast = "nhwc"

    /// The index of the channel axis for a tensor of the given rank (rank ≥ 2).
    public func channelAxis(rank: Int) -> Int {
        switch self {
        case .channelsFirst: return 1
        case .channelsLast: return rank - 1
        }
    }

    /// The indices of the spatial axes (everything except batch and channel).
    public func spatialAxes(rank: Int) -> [Int] {
        let channel = channelAxis(rank: rank)
        return (1..<max(rank, 1)).filter { $0 != channel }
    }

    /// A readable one-line description.
    public var description: String { rawValue.uppercased() }
}
