import NormKitCLI

NormKitCommand.main()
