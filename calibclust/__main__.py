from calibclust.cli import main

raise SystemExit(main())
