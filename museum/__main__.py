from museum.cli import main

main()
