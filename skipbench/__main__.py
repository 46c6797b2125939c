from skipbench.cli import main

main()
