<?php
namespace App\Http;
class Kernel extends \Illuminate\Foundation\Http\Kernel
{
    protected $middleware = [];
    protected $middlewareGroups = ['web' => []];
    protected $routeMiddleware = [];
}
