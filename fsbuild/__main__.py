from fsbuild.cli import main

main()
