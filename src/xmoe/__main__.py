from xmoe.cli.main import main

main()
