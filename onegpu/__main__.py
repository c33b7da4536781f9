from onegpu.cli import main

main()
