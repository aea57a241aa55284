<?php
namespace App\Exceptions;
class Handler extends \Illuminate\Foundation\Exceptions\Handler
{
}
