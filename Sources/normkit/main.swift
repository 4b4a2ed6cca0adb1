import NormKitCLI
NormKitCommand.main()
