from flexbench.cli import main

main()
